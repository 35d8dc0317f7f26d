"""A server that answers ``/v1/embeddings`` with canned bytes: the official client's own
ceiling for benchmark 15 (issue 31).

``python -m benchmarks.canned ANSWERS`` reads a msgpack map of SHA-256(request body) to
response body, serves it on 127.0.0.1 and a free port with the uvicorn settings ``serve``
runs under, and prints ``canned at http://...`` on stderr. Each answer costs a hash and a
dictionary lookup: what is left is uvicorn's and the client's work.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import msgpack


def app_of(answers: dict[bytes, bytes]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        answer = answers[hashlib.sha256(body).digest()]
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    return app


def main() -> None:
    import uvicorn

    from embeddingcache.server import bind
    from embeddingcache.server.running import config

    answers = msgpack.unpackb(Path(sys.argv[1]).read_bytes())
    sock = bind("127.0.0.1", 0)
    print(f"canned at http://127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
    uvicorn.Server(config(app_of(answers), log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
