"""corral: a fault-tolerant runtime for serving language models with MLX, on trio actors.

The public surface, re-exported: open the runtime, call it, catch its typed errors.
"""

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
from corral.protocol.messages import Completion as Completion
from corral.protocol.messages import GenerateParams as GenerateParams
from corral.runtime import Health as Health
from corral.runtime import ModelDescription as ModelDescription
from corral.runtime import Runtime as Runtime
from corral.runtime import TokenStream as TokenStream
from corral.runtime import open_runtime as open_runtime

__all__ = [
    "ActorExitedError", "CircuitBreakerOpenError", "Code", "Completion", "ConfigError",
    "CorralError", "EngineClientError", "EscalationError", "GenerateParams", "Health",
    "ModelDescription", "OverloadedError", "RetryAbortedError", "Runtime", "RuntimeConfig",
    "TimeoutError", "TokenStream", "classify", "load_config", "open_runtime",
]
