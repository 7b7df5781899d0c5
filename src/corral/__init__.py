"""corral: a fault-tolerant runtime for serving language models with MLX, on trio actors.

The public surface, re-exported: open the runtime, call it, catch its typed errors.
"""

from corral.actors.child_spec import ChildSpec as ChildSpec
from corral.config import ConfigError as ConfigError
from corral.config import RuntimeConfig as RuntimeConfig
from corral.config import load_config as load_config
from corral.protocol.errors import ActorExitedError as ActorExitedError
from corral.protocol.errors import CircuitBreakerOpenError as CircuitBreakerOpenError
from corral.protocol.errors import Code as Code
from corral.protocol.errors import CorralError as CorralError
from corral.protocol.errors import EngineClientError as EngineClientError
from corral.protocol.errors import EscalationError as EscalationError
from corral.protocol.errors import OverloadedError as OverloadedError
from corral.protocol.errors import RetryAbortedError as RetryAbortedError
from corral.protocol.errors import TimeoutError as TimeoutError
from corral.protocol.messages import ChatMessage as ChatMessage
from corral.protocol.messages import Choice as Choice
from corral.protocol.messages import Completion as Completion
from corral.protocol.messages import FinishReason as FinishReason
from corral.protocol.messages import GenerateParams as GenerateParams
from corral.protocol.messages import TokenLogprob as TokenLogprob
from corral.protocol.messages import Usage as Usage
from corral.resilience import CircuitBreakerGuard as CircuitBreakerGuard
from corral.resilience import Fallback as Fallback
from corral.resilience import FallbackStatistics as FallbackStatistics
from corral.resilience import Recovered as Recovered
from corral.resilience import Retrying as Retrying
from corral.resilience import circuit_breaker as circuit_breaker
from corral.resilience import retry as retry
from corral.resilience.breaker import CircuitBreaker as CircuitBreaker
from corral.resilience.breaker_types import BreakerStatistics as BreakerStatistics
from corral.resilience.breaker_types import State as CircuitState
from corral.resilience.budget import RetryBudget as RetryBudget
from corral.resilience.budget import RetryStatistics as RetryStatistics
from corral.resilience.classify import classify as classify
from corral.resilience.retries import RetryPolicy as RetryPolicy
from corral.runtime import ChoiceStreams as ChoiceStreams
from corral.runtime import Health as Health
from corral.runtime import ModelDescription as ModelDescription
from corral.runtime import Runtime as Runtime
from corral.runtime import RuntimeStatistics as RuntimeStatistics
from corral.runtime import TokenStream as TokenStream
from corral.runtime import open_runtime as open_runtime
from corral.runtime.stream_buffers import StreamChunk as StreamChunk
from corral.server import build_app as build_app

__all__ = [
    "ActorExitedError", "BreakerStatistics", "ChatMessage", "ChildSpec", "Choice",
    "ChoiceStreams", "CircuitBreaker", "CircuitBreakerGuard", "CircuitBreakerOpenError",
    "CircuitState", "Code", "Completion", "ConfigError", "CorralError", "EngineClientError",
    "EscalationError", "Fallback", "FallbackStatistics", "FinishReason", "GenerateParams",
    "Health", "ModelDescription", "OverloadedError", "Recovered", "RetryAbortedError",
    "RetryBudget", "RetryPolicy", "RetryStatistics", "Retrying", "Runtime", "RuntimeConfig",
    "RuntimeStatistics", "StreamChunk", "TimeoutError", "TokenLogprob", "TokenStream",
    "Usage", "build_app", "circuit_breaker", "classify", "load_config", "open_runtime",
    "retry",
]
