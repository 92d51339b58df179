"""ttrpc, containerd's lightweight RPC protocol: a sans-IO core (framing, protocol) under
thin asyncio transports (server, client). Nothing here knows about containerd."""

from shim.ttrpc.client import Client, Stub
from shim.ttrpc.server import CallContext, Server
from shim.ttrpc.status import Code, ConnectionLost, TtrpcError

__all__ = ["CallContext", "Client", "Code", "ConnectionLost", "Server", "Stub", "TtrpcError"]
