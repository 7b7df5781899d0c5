"""corral on Ray Serve (`pip install corral[ray]`): one supervised corral runtime per
replica, an OpenAI ingress that passes corral's own HTTP replies through, prefix-affine
routing, and deterministic streams that continue on another replica when theirs dies.

`corral serve --ray` runs it; `build_application` is the Serve application for a
deployment of one's own.
"""

from corral.ray.deploy import RayOptions, build_application, connect, deploy, serve_forever

__all__ = ["RayOptions", "build_application", "connect", "deploy", "serve_forever"]
