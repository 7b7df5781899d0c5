"""corral on Ray Serve (`pip install corral[ray]`): one supervised corral runtime per
replica, an OpenAI ingress that passes corral's own HTTP replies through, prefix-affine
routing, and deterministic streams that continue on another replica when theirs dies.

`corral serve --ray` runs it; `build_application` is the Serve application for a
deployment of one's own.

The names below are imported on first use: Serve's proxy imports `corral.ray.front`,
and through this package it would otherwise load the whole runtime and MLX, which on a
loaded machine made the proxy miss Serve's readiness check.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.ray.deploy import RayOptions, build_application, connect, deploy, serve_forever

__all__ = ["RayOptions", "build_application", "connect", "deploy", "serve_forever"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'corral.ray' has no attribute {name!r}")
    module = importlib.import_module("corral.ray.deploy")
    # Importing the submodule bound its name, `deploy`, here: the function takes it
    # back, as an eager `from corral.ray.deploy import deploy` would.
    for public in __all__:
        globals()[public] = getattr(module, public)
    return globals()[name]
