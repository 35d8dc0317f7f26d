from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Nothing in the test suite may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# File digests of model folders (embeddingcache.versions) are kept in the test run's own memo.
os.environ["EMBEDDING_CACHE_DIGESTS"] = os.path.join(
    tempfile.mkdtemp(prefix="embeddingcache-digests-"), "digests.json"
)

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_static_model, build_tiny_model

import embeddingcache
from embeddingcache import EmbeddingCache
from embeddingcache.storage import retry


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real sentence-transformers model folder: 32-d, one token per character."""
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def static_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real sentence-transformers StaticEmbedding model folder (256-d): as fast as a
    transformer on a GPU, built offline."""
    return str(build_static_model(tmp_path_factory.mktemp("models") / "static"))


@pytest.fixture(scope="session")
def prompted_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model, saved with query and document prompts, the document one by default."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("models") / "prompted"
    shutil.copytree(tiny_model, folder)
    config_file = folder / "config_sentence_transformers.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["prompts"] = {"query": "query: ", "document": "passage: "}
    config["default_prompt_name"] = "document"
    config_file.write_text(json.dumps(config), encoding="utf-8")
    return str(folder)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test gets its own default cache directory and no ambient configuration."""
    monkeypatch.setenv("EMBEDDING_CACHE_DIR", str(tmp_path / "default-cache"))
    for name in ("EMBEDDING_CACHE_DB_URL", "EMBEDDING_CACHE_URL", "EMBEDDING_CACHE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(retry, "WAIT_SCALE", 0.0)
    yield
    embeddingcache._reset_shared_caches()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def cache(tiny_model: str, cache_dir: Path) -> Iterator[EmbeddingCache]:
    """The tiny model's cache in SQLite files under ``cache_dir``."""
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as c:
        yield c


@pytest.fixture
def file_cache(tiny_model: str, cache_dir: Path) -> Iterator[EmbeddingCache]:
    """The same, for modules whose ``cache`` runs on every backend."""
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as c:
        yield c


class EncodeSpy:
    """Counts the texts the real model encodes, calling straight through to it."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    @property
    def texts(self) -> list[str]:
        return [text for call in self.calls for text in call]


@pytest.fixture
def encode_spy(monkeypatch: pytest.MonkeyPatch) -> EncodeSpy:
    from sentence_transformers import SentenceTransformer

    spy = EncodeSpy()
    original = SentenceTransformer.encode

    def encode(self: SentenceTransformer, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        spy.calls.append(list(inputs) if isinstance(inputs, list) else [inputs])
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode", encode)
    return spy


@pytest.fixture(scope="session")
def direct_model(tiny_model: str) -> object:
    """The same tiny model, loaded directly, for comparisons."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(tiny_model, device="cpu")


# -- backends ------------------------------------------------------------------------------

PG_ENV = "EMBEDDING_CACHE_TEST_DB_URL"


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"{PG_ENV} is not set: no PostgreSQL server to test against")
    return url


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """The URL of a new database on the test server, with a unique name, dropped afterwards."""
    import uuid

    from sqlalchemy import create_engine, make_url, text

    name = f"ec_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(
        make_url(admin_url).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        embeddingcache._reset_shared_caches()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database of this test's own on the test server, dropped afterwards."""
    with fresh_database(pg_admin_url) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def storage(request: pytest.FixtureRequest, cache_dir: Path) -> dict[str, Any]:
    """Where a cache keeps its tables: a SQLite directory, or a fresh Postgres database."""
    if request.param == "sqlite":
        return {"cache_dir": cache_dir}
    return {"db_url": request.getfixturevalue("pg_url")}


@pytest.fixture
def any_cache(tiny_model: str, storage: dict[str, Any]) -> Iterator[EmbeddingCache]:
    """The tiny model's cache on every backend."""
    with EmbeddingCache(tiny_model, device="cpu", **storage) as c:
        yield c


def _alembic_config(connection: Any, schema: str | None) -> Any:
    from alembic.config import Config

    from embeddingcache.storage import migrate

    config = Config()
    config.set_main_option("script_location", migrate.script_location())
    config.attributes["connection"] = connection
    config.attributes["schema"] = schema
    return config


@pytest.fixture
def upgrade_to() -> Callable[[Any, str | None, str], None]:
    """``upgrade_to(connection, schema, revision)``: bring a place to an older revision with
    Alembic, as an earlier embeddingcache left it (then a test fills it and opens it)."""

    def upgrade(connection: Any, schema: str | None, revision: str) -> None:
        from alembic import command
        from sqlalchemy import text

        if schema is not None:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        command.upgrade(_alembic_config(connection, schema), revision)

    return upgrade


@pytest.fixture
def downgrade_to() -> Callable[[Any, str], None]:
    """``downgrade_to(connection, revision)``: take a SQLite file back to an older revision
    with Alembic, rows kept, as an earlier embeddingcache would have left it."""

    def downgrade(connection: Any, revision: str) -> None:
        from alembic import command

        command.downgrade(_alembic_config(connection, None), revision)

    return downgrade


@pytest.fixture
def any_store(storage: dict[str, Any]) -> Iterator[Any]:
    from embeddingcache.storage import Store, layout_for

    store = Store(layout_for(storage.get("cache_dir", Path("unused")), storage.get("db_url")))
    yield store
    store.close()


# -- servers -------------------------------------------------------------------------------


class RunningServer:
    """A real uvicorn server on 127.0.0.1 and a free port, in a thread of this process."""

    def __init__(self, app: Any, connections: Any = None) -> None:
        import threading

        import uvicorn

        from embeddingcache.server import bind
        from embeddingcache.server.running import config

        self.app = app
        self._sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        # The limits `serve` runs under (`connections`: others), as `serve` configures uvicorn.
        self._server = uvicorn.Server(
            config(app, connections, log_level="warning", timeout_graceful_shutdown=1)
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()


@pytest.fixture
def server_cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "server-cache"


@pytest.fixture
def start_server(
    tiny_model: str, server_cache_dir: Path
) -> Iterator[Callable[..., tuple[RunningServer, Any]]]:
    """Start a backend serving the tiny model (or ``models=``): ``start_server(token=...,
    allow_push=..., limits=..., wrap=..., app_options=..., connections=...)`` gives the
    running server and its ``Backend``."""
    from embeddingcache.server import Backend, create_app

    servers: list[RunningServer] = []

    def start(
        *,
        wrap: Callable[[Any], Any] | None = None,
        storage: dict[str, Any] | None = None,
        models: list[str] | None = None,
        app_options: dict[str, Any] | None = None,
        connections: Any = None,
        **options: Any,
    ) -> tuple[RunningServer, Any]:
        cache = EmbeddingCache(
            tiny_model,
            remote_url=False,
            fallback_providers=("local",),
            device="cpu",
            **(storage or {"cache_dir": server_cache_dir}),
        )
        backend = Backend(cache, models or [tiny_model], **options)
        app = create_app(backend, **(app_options or {}))
        server = RunningServer(wrap(app) if wrap else app, connections)
        servers.append(server)
        return server, backend

    yield start
    for server in servers:
        server.stop()


class ServerProcess:
    """``embeddingcache serve`` in a process of its own, on a free port."""

    def __init__(self, *args: str) -> None:
        import subprocess
        import threading

        self.process = subprocess.Popen(
            [sys.executable, "-m", "embeddingcache.cli", "serve", "--port", "0", *args],
            # Both streams, in `output`: uvicorn's access log goes to stdout.
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        assert self.process.stdout is not None
        deadline = time.monotonic() + 120
        self.url = ""
        for line in self.process.stdout:
            self.output.append(line)
            if " at http://" in line:
                self.url = line.rsplit(" at ", 1)[1].strip()
                break
            if time.monotonic() > deadline:
                break
        if not self.url:
            self.process.kill()
            raise RuntimeError("serve did not start:\n" + "".join(self.output))
        # Keep reading, so that a chatty server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except Exception:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServerProcess]]:
    """Start ``embeddingcache serve`` processes, stopped after the test."""
    processes: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        process = ServerProcess(*args)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.stop()
