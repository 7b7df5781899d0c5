"""The runtime configuration: schema, loading and overlays, seed-name aliases, errors.

`load_config` reads config/runtime.yaml (or any file), applies the `CORRAL_ENV` overlay
and overrides, and returns a frozen `RuntimeConfig`; a bad key or value is a
`ConfigError` naming its path. The names below are the package's public surface.
"""

from corral.config.aliases import ALIASES as ALIASES
from corral.config.errors import ConfigError as ConfigError
from corral.config.loading import config_from_mapping as config_from_mapping
from corral.config.loading import config_warnings as config_warnings
from corral.config.loading import deep_merge as deep_merge
from corral.config.loading import load_config as load_config
from corral.config.loading import render_config as render_config
from corral.config.schema import BackoffConfig as BackoffConfig
from corral.config.schema import CallsConfig as CallsConfig
from corral.config.schema import CircuitBreakerConfig as CircuitBreakerConfig
from corral.config.schema import FallbackResponse as FallbackResponse
from corral.config.schema import GenerationConfig as GenerationConfig
from corral.config.schema import JsonRpcConfig as JsonRpcConfig
from corral.config.schema import LoggingConfig as LoggingConfig
from corral.config.schema import ModelConfig as ModelConfig
from corral.config.schema import PythonRuntimeConfig as PythonRuntimeConfig
from corral.config.schema import ResponsesConfig as ResponsesConfig
from corral.config.schema import RestartsConfig as RestartsConfig
from corral.config.schema import RetryBudgetConfig as RetryBudgetConfig
from corral.config.schema import RetryConfig as RetryConfig
from corral.config.schema import RuntimeConfig as RuntimeConfig
from corral.config.schema import ServerConfig as ServerConfig
from corral.config.schema import StreamRegistryConfig as StreamRegistryConfig
from corral.config.schema import SupervisionConfig as SupervisionConfig
from corral.protocol.worker import PrefixCacheConfig as PrefixCacheConfig

__all__ = [
    "ALIASES",
    "BackoffConfig",
    "CallsConfig",
    "CircuitBreakerConfig",
    "ConfigError",
    "FallbackResponse",
    "GenerationConfig",
    "JsonRpcConfig",
    "LoggingConfig",
    "ModelConfig",
    "PrefixCacheConfig",
    "PythonRuntimeConfig",
    "ResponsesConfig",
    "RestartsConfig",
    "RetryBudgetConfig",
    "RetryConfig",
    "RuntimeConfig",
    "ServerConfig",
    "StreamRegistryConfig",
    "SupervisionConfig",
    "config_from_mapping",
    "config_warnings",
    "deep_merge",
    "load_config",
    "render_config",
]
