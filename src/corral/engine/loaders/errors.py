"""The one error a loader raises when a model reference leads to no model it can serve.

It is a ModelLoadError that retrying cannot fix: the runtime answers it to the client
(HTTP 400, JSON-RPC -32001) instead of restarting anything.
"""

from __future__ import annotations

from typing import Any

from corral.protocol.errors import Code, EngineClientError

__all__ = ["model_load_error"]


def model_load_error(reference: str, message: str, **details: Any) -> EngineClientError:
    """A non-retryable ModelLoadError for ``reference``, with ``message`` in the user's
    words and ``details`` (JSON-able) beside the path."""
    return EngineClientError(Code.MODEL_LOAD_ERROR, message, {"path": reference, **details},
                             retryable=False)
