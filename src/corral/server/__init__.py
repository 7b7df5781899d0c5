"""The transport domain: JSON-RPC and HTTP listeners, children of the transport supervisor."""
