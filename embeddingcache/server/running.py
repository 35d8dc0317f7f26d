"""Running an app: the listening socket, and uvicorn over it."""

from __future__ import annotations

import socket

from fastapi import FastAPI

__all__ = ["bind", "serve"]


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it from ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    return sock


def serve(app: FastAPI, sock: socket.socket, *, access_log: bool = False) -> None:
    """Run the app with uvicorn on an already bound socket until SIGINT or SIGTERM."""
    import uvicorn

    config = uvicorn.Config(
        app, access_log=access_log, log_level="info", timeout_graceful_shutdown=5
    )
    uvicorn.Server(config).run(sockets=[sock])
