"""The backend: ``embeddingcache serve``, a FastAPI app over one `EmbeddingCache`.

The cache behind the app computes with the local model and never calls another backend.
Everything a client sends is checked by `embeddingcache.protocol` (and `openai_wire`); what it
gets wrong is answered with a 4xx naming the mistake, so that no input produces a 5xx. A 503
means the server's own storage or model failed.

- `backend`: `Backend`, what is served and how the cache answers each route;
- `app`: `create_app`, the routes over a backend;
- `running`: `bind` and `serve`, the socket and uvicorn.

FastAPI and uvicorn come with the ``server`` extra: ``pip install 'embeddingcache[server]'``.
"""

from .app import create_app
from .backend import Backend
from .running import bind, serve

__all__ = ["Backend", "bind", "create_app", "serve"]
