"""The transport domain: JSON-RPC and HTTP listeners, children of the transport supervisor.

`listen` (sockets, stdio, the accept loop), `connection` (one JSON-RPC connection),
`jsonrpc` (the JSON-RPC listener and methods), `openai` (jobs, shapes, statuses),
`routes` (the HTTP endpoints), `http` (the ASGI app and the HTTP listener), and `serve`
(`corral serve`). Nothing here reaches past the `Runtime` facade.
"""

from corral.server.http import HttpLimits as HttpLimits
from corral.server.http import HttpServer as HttpServer
from corral.server.http import build_app as build_app
from corral.server.jsonrpc import JsonRpcListener as JsonRpcListener
from corral.server.listen import ListenerStatistics as ListenerStatistics

__all__ = ["HttpLimits", "HttpServer", "JsonRpcListener", "ListenerStatistics", "build_app"]
