"""`moe serve [MODEL]`: an OpenAI-compatible HTTP server over one model, on loopback unless told otherwise."""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Annotated

import typer
from moe.runtime.errors import MoeError

from .common import err, open_model
from .options import KvCache, KvCacheKind, MemoryBudget, ModelOrDemo, Threads

EXAMPLE = """Examples:

\b
  moe serve                                        (the bundled demo on http://127.0.0.1:8080/v1)
  moe serve mistralai--Mixtral-8x7B-v0.1 --port 9000 --memory-budget 8GB
  curl http://127.0.0.1:8080/v1/completions -d '{"prompt": "def add(a, b):", "max_tokens": 20}'
"""
SHUTDOWN_S = 2  # on Ctrl-C, how long open responses may go on before they are cut


def serve(
    model: ModelOrDemo = None,
    host: Annotated[str, typer.Option(
        help="Address to listen on. The default is this machine only; 0.0.0.0 opens it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on; 0 picks a free one.")] = 8080,
    memory_budget: MemoryBudget = None,
    threads: Threads = None,
    kv_cache: KvCache = KvCacheKind.auto,
) -> None:
    """Serve a model with OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models and /health.

    Requests queue and run one at a time; a prompt reuses the longest prefix the KV cache holds.
    Fields a request leaves out take `moe run`'s defaults (greedy, 256 tokens at most).
    """
    import uvicorn
    from moe.runtime.server import Api

    listener = _bind(host, port)  # before the model loads, so a busy port is said at once
    with listener:
        loaded, _ = open_model(model, memory_budget, threads, kv_cache=kv_cache.value)
        try:
            name = loaded.layout.folder.name
            app = Api(loaded, name).app()
            address = listener.getsockname()
            shown = f"[{address[0]}]" if listener.family == socket.AF_INET6 else address[0]
            err.print(f"serving {name} at http://{shown}:{address[1]}/v1 (Ctrl-C stops)", markup=False)
            if not ipaddress.ip_address(address[0]).is_loopback:
                err.print(f"note: {address[0]} is reachable from other machines, and the API has no password",
                          style="yellow", markup=False)
            config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=SHUTDOWN_S)
            uvicorn.Server(config).run(sockets=[listener])
        finally:
            loaded.close()


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        return socket.create_server(address, family=family)
    except socket.gaierror:
        raise MoeError(f"--host {host}: not an address or name this machine can listen on") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise MoeError(f"port {port} on {host} is in use; give another with --port (0 picks a free one)") from None
        raise MoeError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
