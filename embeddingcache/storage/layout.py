"""Where the hashstring table and each model shard live: the one place that decides it.

With a cache directory (the embedded default), texts live in ``hashstring.db`` and each model
in ``<model_slug>.db`` beside it. Every path is built from a slug (see ``keys.model_slug``),
so no model name can put a file outside the directory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, MetaData, Table

from .schema import embedding_table, hashstring_table, model_info_table
from .sqlite import SHARD_PAGE_SIZE, sqlite_engine

__all__ = ["Place", "SQLiteLayout", "ShardPlace"]

_TEXT_METADATA = MetaData()
_HASHSTRING = hashstring_table(_TEXT_METADATA)
_SHARD_METADATA = MetaData()
_EMBEDDING = embedding_table(_SHARD_METADATA)
_MODEL_INFO = model_info_table(_SHARD_METADATA)

TEXT_FILE = "hashstring.db"


@dataclass(frozen=True)
class Place:
    """An engine and the metadata of the tables it holds for one job."""

    engine: Engine
    metadata: MetaData
    path: Path | None


@dataclass(frozen=True)
class ShardPlace(Place):
    embedding: Table
    model_info: Table


@dataclass(frozen=True)
class TextPlace(Place):
    hashstring: Table


class SQLiteLayout:
    """One SQLite file for texts and one per model shard, in a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._engines: dict[Path, Engine] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        return str(self.directory)

    def text_path(self) -> Path:
        return self.directory / TEXT_FILE

    def shard_path(self, slug: str) -> Path:
        path = self.directory / f"{slug}.db"
        # model_slug already guarantees this; the check keeps a future change honest.
        if path.parent != self.directory:
            raise AssertionError(f"shard path {path} escapes {self.directory}")
        return path

    def exists(self, path: Path) -> bool:
        return path.exists()

    def shard_slugs(self) -> list[str]:
        """Slugs of the shards present, in name order."""
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.db") if p.name != TEXT_FILE)

    def bytes_on_disk(self, path: Path) -> int:
        """A database's size with its write-ahead log."""
        files = [path, path.with_name(path.name + "-wal")]
        return sum(f.stat().st_size for f in files if f.exists())

    def text_place(self) -> TextPlace:
        path = self.text_path()
        return TextPlace(self._engine(path, None), _TEXT_METADATA, path, _HASHSTRING)

    def shard_place(self, slug: str) -> ShardPlace:
        path = self.shard_path(slug)
        engine = self._engine(path, SHARD_PAGE_SIZE)
        return ShardPlace(engine, _SHARD_METADATA, path, _EMBEDDING, _MODEL_INFO)

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def _engine(self, path: Path, page_size: int | None) -> Engine:
        with self._lock:
            engine = self._engines.get(path)
            if engine is None:
                engine = self._engines[path] = sqlite_engine(path, page_size=page_size)
            return engine

    def close(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.dispose()
