"""Where the hashstring table and each model shard live: the one module that decides it.

- A cache directory (the embedded default): texts in ``hashstring.db``, each model in
  ``<model_slug>.db`` beside it, tables ``hashstring``, ``embedding`` and ``model_info``.
  Every path is built from a slug (``keys.model_slug``), so no model name can put a file
  outside the directory.
- A server database URL (Postgres): the same tables, texts in schema ``embeddingcache`` and
  each model in a schema of its own, ``ec_<name>``: a valid identifier of at most 63 bytes
  whatever the model name, with a hash of the exact name unless it is a catalog model.

Each place carries its own ``alembic_version`` table (see ``migrate.py``).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from sqlalchemy import (
    URL,
    Engine,
    create_engine,
    event,
    func,
    inspect,
    make_url,
    select,
)
from sqlalchemy import exc as sa_exc

from ..errors import InvalidInputError, StorageError
from ..keys import check_model_name, model_slug
from ..models import catalog_name
from .faults import out_of_room
from .places import Place, ShardPlace, TextPlace
from .sqlite import SHARD_PAGE_SIZE, Reader, is_read_only, sqlite_engine
from .tables import HitRow
from .timeouts import Gate, Timeouts

if TYPE_CHECKING:
    from .postgres import PostgresConnections

__all__ = [
    "Layout",
    "Place",
    "SQLiteLayout",
    "ServerLayout",
    "ShardPlace",
    "TextPlace",
    "layout_for",
    "server_schema",
]

TEXT_FILE = "hashstring.db"
TEXT_SCHEMA = "embeddingcache"
SHARD_SCHEMA_PREFIX = "ec_"
MAX_IDENTIFIER = 63  # Postgres truncates longer names, which could merge two models


class ShardReader(Protocol):
    """A shard's hit path outside SQLAlchemy (``sqlite.Reader``, ``postgres.PostgresReader``)."""

    def rows(self, keys: Sequence[bytes], chunk: int, *, tokens: bool = False) -> list[HitRow]: ...
    def close(self) -> None: ...


class Layout(Protocol):
    def describe(self) -> str: ...
    def text_place(self) -> TextPlace: ...
    def shard_place(self, model: str) -> ShardPlace: ...
    def may_exist(self, place: Place) -> bool: ...
    def shard_places(self) -> list[ShardPlace]: ...
    def bytes_on_disk(self, place: Place) -> int: ...
    def live_bytes(self, place: Place) -> int: ...
    def prepare(self) -> None: ...
    def out_of_room(self) -> bool: ...
    def reader(self, place: ShardPlace) -> ShardReader | None: ...
    def read_only(self, place: Place) -> bool: ...
    def replaced(self, place: Place) -> bool: ...
    def close(self) -> None: ...


class SQLiteLayout:
    """One SQLite file for texts and one per model shard, in a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._engines: dict[Path, Engine] = {}
        self._readers: dict[Path, Reader] = {}
        self._read_only: dict[Path, bool] = {}
        self._places: dict[Path, Place] = {}
        # (st_dev, st_ino) of each file as this process's connections first opened it.
        self._identity: dict[Path, tuple[int, int] | None] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        return str(self.directory)

    def text_place(self) -> TextPlace:
        path = self.directory / TEXT_FILE
        with self._lock:
            place = self._places.get(path)
        if place is None:
            place = TextPlace.make(self._engine(path, None), None, path, TEXT_FILE)
            with self._lock:
                place = self._places.setdefault(path, place)
        assert isinstance(place, TextPlace)
        return place

    def shard_place(self, model: str) -> ShardPlace:
        return self._shard_at(self.directory / f"{model_slug(model)}.db")

    def _shard_at(self, path: Path) -> ShardPlace:
        # model_slug already guarantees this; the check keeps a future change honest.
        if path.parent != self.directory:
            raise AssertionError(f"shard path {path} escapes {self.directory}")
        # One place (and so one set of Table objects) per file: statements built on them
        # hit SQLAlchemy's compiled cache instead of filling it anew on every call.
        with self._lock:
            place = self._places.get(path)
        if place is None:
            place = ShardPlace.make(self._engine(path, SHARD_PAGE_SIZE), None, path, path.name)
            with self._lock:
                place = self._places.setdefault(path, place)
        assert isinstance(place, ShardPlace)
        return place

    def may_exist(self, place: Place) -> bool:
        """A read never creates a file: no file, nothing stored."""
        return place.path is not None and place.path.exists()

    def shard_places(self) -> list[ShardPlace]:
        if not self.directory.is_dir():
            return []
        paths = sorted(p for p in self.directory.glob("*.db") if p.name != TEXT_FILE)
        return [self._shard_at(p) for p in paths]

    def bytes_on_disk(self, place: Place) -> int:
        """A file's size with its write-ahead log."""
        if place.path is None:
            return 0
        files = [place.path, place.path.with_name(place.path.name + "-wal")]
        return sum(f.stat().st_size for f in files if f.exists())

    def live_bytes(self, place: Place) -> int:
        """The bytes of a file's pages in use, as its latest state has them: free pages and
        the write-ahead log left out (a log is emptied at checkpoints, and while a reader
        holds an old snapshot the file keeps its old size; neither is data)."""
        with place.engine.connect() as connection:
            size, pages, free = (
                connection.exec_driver_sql(f"PRAGMA {name}").scalar_one()
                for name in ("page_size", "page_count", "freelist_count")
            )
        return int(size) * (int(pages) - int(free))

    def prepare(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # A file in the way or a permission is a mistake, a full disk a fault: either way
            # a storage error, which the pipeline's policy tells apart (`faults.is_fault`).
            message = f"cannot create the cache directory {self.directory}: {exc}"
            raise StorageError(message) from exc

    def out_of_room(self) -> bool:
        """Whether the directory's disk is full (see `faults.out_of_room`)."""
        return out_of_room(self.directory)

    def _engine(self, path: Path, page_size: int | None) -> Engine:
        with self._lock:
            engine = self._engines.get(path)
            if engine is None:
                engine = self._engines[path] = sqlite_engine(
                    path, page_size=page_size, read_only=self._read_only_path(path)
                )
                event.listen(engine, "connect", lambda *_: self._opened(path))
            return engine

    def _opened(self, path: Path) -> None:
        with self._lock:
            if self._identity.get(path) is None:
                self._identity[path] = _file_identity(path)

    def replaced(self, place: Place) -> bool:
        """Whether the place's file was removed or replaced since this process opened it (a
        `prune --model` elsewhere, a user's ``rm``): its connections are then closed, so that
        the next ones open, or create, the file that is on disk instead of writing to an
        unlinked one. One ``stat``, for a write transaction to call first."""
        path = place.path
        if path is None:
            return False
        with self._lock:
            known = self._identity.get(path)
        if known is None or _file_identity(path) == known:
            return False  # not opened yet (the next connection opens what is there), or same
        with self._lock:
            self._identity.pop(path, None)
            engine = self._engines.get(path)
            reader = self._readers.get(path)
        if engine is not None:
            engine.dispose()
        if reader is not None:
            reader.close()
        return True

    def _read_only_path(self, path: Path) -> bool:
        # Decided once per file and process, when its engine is made: a cache baked into an
        # image or on a shared mount stays read-only for the process's life.
        found = self._read_only.get(path)
        if found is None:
            found = self._read_only[path] = is_read_only(path)
        return found

    def read_only(self, place: Place) -> bool:
        """Whether this process can only read the place's file (see ``sqlite.is_read_only``)."""
        return place.path is not None and self._read_only_path(place.path)

    def reader(self, place: ShardPlace) -> Reader | None:
        """The plain sqlite3 reader of a shard file (the hit path)."""
        if place.path is None:
            return None
        with self._lock:
            reader = self._readers.get(place.path)
            if reader is None:
                reader = self._readers[place.path] = Reader(
                    place.path, place.embedding.name, read_only=self._read_only_path(place.path)
                )
            return reader

    def close(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
            readers, self._readers = list(self._readers.values()), {}
            self._places.clear()
            self._identity.clear()  # the next connections may open other files (a restore)
        for engine in engines:
            engine.dispose()
        for reader in readers:
            reader.close()


def server_schema(model: str) -> str:
    """The schema of a model's shard in a server database: ``ec_`` and a valid identifier."""
    check_model_name(model)
    if catalog_name(model) == model:
        return SHARD_SCHEMA_PREFIX + re.sub(r"[^a-z0-9]+", "_", model.lower())
    digest = hashlib.sha256(model.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    room = MAX_IDENTIFIER - len(SHARD_SCHEMA_PREFIX) - len(digest) - 1
    readable = re.sub(r"[^a-z0-9]+", "_", model.lower()).strip("_")[:room].rstrip("_") or "model"
    return f"{SHARD_SCHEMA_PREFIX}{readable}_{digest}"


def shown_url(db_url: str) -> str:
    """A database URL as it may be shown: its password masked (nothing of it, when it
    cannot be parsed)."""
    try:
        return _server_url(db_url).render_as_string(hide_password=True)
    except InvalidInputError:
        return "<a database URL>"


def _server_url(db_url: str) -> URL:
    try:
        url = make_url(db_url)
    except sa_exc.ArgumentError as exc:
        raise InvalidInputError(f"not a database URL: {exc}") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")  # psycopg 3, the `postgres` extra
    return url


class ServerLayout:
    """Texts and every shard in one server database, a schema each."""

    def __init__(self, db_url: str) -> None:
        self.url = _server_url(db_url)
        if self.url.get_backend_name() != "postgresql":
            raise InvalidInputError(
                f"unsupported database {self.url.get_backend_name()!r} in "
                f"{self.describe()}; embeddingcache supports SQLite (cache_dir) and PostgreSQL"
            )
        try:
            from . import postgres

            # Every wait for the database is bounded, and an outage is waited for within
            # bounds, by one gate for the engine and the hit path (timeouts.py, issue 30).
            self.gate = Gate(Timeouts.from_env())
            # pre_ping replaces a connection the server dropped before it is used.
            self.engine = create_engine(
                self.url,
                pool_pre_ping=True,
                connect_args=postgres.connect_args(self.url, self.gate.timeouts),
            )
            postgres.bind(self.engine, self.gate)
            self._readers: dict[str, ShardReader] = {}
            self._connections: PostgresConnections | None = None  # the hit path's
            self._places: dict[str, Place] = {}
            self._lock = threading.Lock()
        except ImportError as exc:
            raise InvalidInputError(
                f"no driver for {self.describe()}: pip install 'embeddingcache[postgres]'"
            ) from exc

    def describe(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def text_place(self) -> TextPlace:
        place = self._places.get(TEXT_SCHEMA)
        if place is None:
            place = TextPlace.make(self.engine, TEXT_SCHEMA, None, f"{TEXT_SCHEMA}.hashstring")
            with self._lock:
                place = self._places.setdefault(TEXT_SCHEMA, place)
        assert isinstance(place, TextPlace)
        return place

    def shard_place(self, model: str) -> ShardPlace:
        # One place per schema, as SQLiteLayout keeps one per file.
        return self._shard_in(server_schema(model))

    def _shard_in(self, schema: str) -> ShardPlace:
        place = self._places.get(schema)
        if place is None:
            place = ShardPlace.make(self.engine, schema, None, schema)
            with self._lock:
                place = self._places.setdefault(schema, place)
        assert isinstance(place, ShardPlace)
        return place

    def may_exist(self, place: Place) -> bool:
        return True  # the migration state says; see migrate.state

    def shard_places(self) -> list[ShardPlace]:
        with self.engine.connect() as connection:
            schemas = inspect(connection).get_schema_names()
        return [self._shard_in(s) for s in sorted(schemas) if s.startswith(SHARD_SCHEMA_PREFIX)]

    def bytes_on_disk(self, place: Place) -> int:
        table = (
            place.embedding if isinstance(place, ShardPlace) else cast(TextPlace, place).hashstring
        )
        with self.engine.connect() as connection:
            size = connection.scalar(
                select(func.pg_total_relation_size(f"{place.schema}.{table.name}"))
            )
        return int(size or 0)

    def live_bytes(self, place: Place) -> int:
        return self.bytes_on_disk(place)  # no size budget on Postgres: see storage/evict.py

    def prepare(self) -> None:
        pass

    def out_of_room(self) -> bool:
        return False  # the server says so itself (SQLSTATE 53100: `faults.no_room`)

    def reader(self, place: ShardPlace) -> ShardReader | None:
        """The plain psycopg reader of a shard's schema (the hit path)."""
        from .postgres import PostgresConnections, PostgresReader

        with self._lock:
            reader = self._readers.get(place.name)
            if reader is None:
                if self._connections is None:
                    self._connections = PostgresConnections(self.url, self.gate)
                table = f"{place.schema}.{place.embedding.name}"
                reader = self._readers[place.name] = PostgresReader(self._connections, table)
            return reader

    def read_only(self, place: Place) -> bool:
        return False  # a database refuses a write with its own error

    def replaced(self, place: Place) -> bool:
        return False  # a schema is dropped, never unlinked under an open connection

    def close(self) -> None:
        with self._lock:
            self._readers.clear()
            connections, self._connections = self._connections, None
        if connections is not None:
            connections.close()
        self.engine.dispose()


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def layout_for(cache_dir: Path, db_url: str | None) -> Layout:
    """The layout of a cache: a server database when a URL is given, else the directory."""
    if db_url is None:
        return SQLiteLayout(cache_dir)
    if db_url.startswith("sqlite"):
        raise InvalidInputError(
            "for a SQLite cache pass cache_dir (a directory of files), not a sqlite:// URL"
        )
    return ServerLayout(db_url)
