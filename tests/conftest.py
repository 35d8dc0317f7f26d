from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Nothing in the test suite may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_model

import embeddingcache
from embeddingcache import EmbeddingCache
from embeddingcache.storage import retry


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real sentence-transformers model folder: 32-d, one token per character."""
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


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


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database of this test's own on the test server, dropped afterwards."""
    import uuid

    from sqlalchemy import create_engine, make_url, text

    name = f"ec_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(
        make_url(pg_admin_url).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        embeddingcache._reset_shared_caches()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


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


@pytest.fixture
def any_store(storage: dict[str, Any]) -> Iterator[Any]:
    from embeddingcache.storage import Store, layout_for

    store = Store(layout_for(storage.get("cache_dir", Path("unused")), storage.get("db_url")))
    yield store
    store.close()
