"""corral: a fault-tolerant runtime for serving language models with MLX, on trio actors.

The public surface, re-exported: open the runtime, call it, catch its typed errors.
"""

from corral.actors.streams import StreamChunk as StreamChunk
from corral.actors.supervisor import ChildSpec as ChildSpec
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
from corral.protocol.errors import classify as classify
from corral.protocol.messages import ChatMessage as ChatMessage
from corral.protocol.messages import Choice as Choice
from corral.protocol.messages import Completion as Completion
from corral.protocol.messages import FinishReason as FinishReason
from corral.protocol.messages import GenerateParams as GenerateParams
from corral.protocol.messages import TokenLogprob as TokenLogprob
from corral.protocol.messages import Usage as Usage
from corral.runtime import ChoiceStreams as ChoiceStreams
from corral.runtime import Health as Health
from corral.runtime import ModelDescription as ModelDescription
from corral.runtime import Runtime as Runtime
from corral.runtime import RuntimeStatistics as RuntimeStatistics
from corral.runtime import TokenStream as TokenStream
from corral.runtime import open_runtime as open_runtime
from corral.server import build_app as build_app

__all__ = [
    "ActorExitedError", "ChatMessage", "ChildSpec", "Choice", "ChoiceStreams",
    "CircuitBreakerOpenError", "Code", "Completion", "ConfigError", "CorralError",
    "EngineClientError", "EscalationError", "FinishReason", "GenerateParams", "Health",
    "ModelDescription", "OverloadedError", "RetryAbortedError", "Runtime", "RuntimeConfig",
    "RuntimeStatistics", "StreamChunk", "TimeoutError", "TokenLogprob", "TokenStream",
    "Usage", "build_app", "classify", "load_config", "open_runtime",
]
