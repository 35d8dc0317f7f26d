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
