"""Backup and restore of a SQLite cache folder while it is in use (issue 33).

A backup is a manifest and one object per file of the cache, in a folder or a bucket
(`embeddingcache.destinations`):

    DEST/manifest.json                  what the backup holds (below)
    DEST/files/<sha256 of the file>.db  each file, named by its digest

Each file is copied as of one moment while other processes read and write it
(`storage.snapshot.copy`: SQLite's online backup API under one read transaction, so writers
never wait for it), brought to the current schema, sealed into one self-contained file and
checked (``PRAGMA integrity_check``) on this machine, then sent. An object whose name (its
digest) and size are already at DEST is not sent again: a nightly backup of a big cache sends
only the shards that changed since the last. The manifest is written last, in one piece, and
only then are the objects no manifest names removed: a backup that fails half way leaves the
previous one whole.

The manifest (JSON): ``format`` (``"embeddingcache-backup"``), ``version`` (1),
``created_at`` (UTC, ISO 8601), ``library_version``, ``source`` (the cache folder) and
``files``: for each file its ``name`` in the cache folder, ``bytes``, ``sha256``, ``schema``
(its schema revision), ``entries`` (vectors in a shard, texts in ``hashstring.db``), and for a
shard its ``model``, ``dimension`` and ``model_revision``.

A restore fetches every file into a hidden folder inside the cache folder and checks each
against the manifest (size and SHA-256) and with ``PRAGMA integrity_check`` before any is put
in place; then it moves them in (a rename each) and upgrades older schema revisions through the
usual migrations. A cache folder that holds files is replaced only when asked (``force``).

A Postgres cache is backed up with ``pg_dump`` and restored with ``pg_restore``
(docs/recipes.md): nothing here reimplements them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._version import __version__
from .destinations import Destination, destination
from .errors import BackupError, InvalidInputError
from .progress import Progress
from .storage import SQLiteLayout, Store, snapshot

__all__ = ["MANIFEST", "BackupFile", "BackupReport", "RestoreReport", "backup", "restore"]

FORMAT = "embeddingcache-backup"
VERSION = 1
MANIFEST = "manifest.json"
OBJECTS = "files/"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,250}\.db")  # what `keys.model_slug` gives, + .db
_DIGEST = re.compile(r"[0-9a-f]{64}")
_READ = 1 << 20


@dataclass(frozen=True)
class BackupFile:
    """One file of a backup, as its manifest lists it."""

    name: str
    """Its name in the cache folder: ``hashstring.db`` (the texts) or a shard's file."""
    bytes: int
    sha256: str
    """The SHA-256 of its bytes, in hex: a restore checks it, and it names the object."""
    schema: str | None
    """Its schema revision (``t0001``, ``s0007``...)."""
    entries: int
    """The vectors of a shard, the texts of ``hashstring.db``."""
    model: str | None = None
    """A shard's model (``None`` for the texts, or a shard `prune` emptied)."""
    dimension: int | None = None
    model_revision: str | None = None
    """The version of the model its vectors are of (see docs/storage.md)."""

    @property
    def object(self) -> str:
        """Where the file is kept at the destination."""
        return f"{OBJECTS}{self.sha256}.db"


@dataclass(frozen=True)
class BackupReport:
    """What `EmbeddingCache.backup` did."""

    destination: str
    """Where the backup is (a folder, or ``s3://bucket/prefix``)."""
    files: list[BackupFile]
    sent: int
    """The files sent; the others were at the destination already, unchanged."""
    bytes_sent: int
    seconds: float


@dataclass(frozen=True)
class RestoreReport:
    """What `EmbeddingCache.restore` did."""

    source: str
    cache_dir: str
    created_at: str
    """When the backup was taken (UTC, ISO 8601)."""
    files: list[BackupFile]
    upgraded: list[str]
    """The files brought from an older schema revision to the current one."""
    replaced: list[str]
    """The files the cache folder held before, replaced or removed (``force``)."""


def backup(
    store: Store, where: str | os.PathLike[str], *, show_progress: bool = False
) -> BackupReport:
    """Back up the store's SQLite files to ``where``: see the module's docstring.

    Raises:
        InvalidInputError: a database cache (use pg_dump), or a destination of another kind.
        BackupError: the destination could not be written.
        StorageError: a file of the cache could not be copied.
    """
    folder = _folder(store, "pg_dump")
    target = destination(where)
    sources = snapshot.cache_files(folder)
    if not sources:
        raise InvalidInputError(f"nothing to back up: {folder} holds no cache file")
    started = time.monotonic()
    store.flush()  # this process's waiting use counts go into the copies
    # The bytes to copy (and send), about: a file's latest pages may still be in its log.
    total = sum(map(snapshot.size, sources)) * (2 if target.remote else 1)
    files: list[BackupFile] = []
    sent: list[BackupFile] = []
    with target.staging() as staging, Progress(total, enabled=show_progress, unit="B") as bar:
        for source in sources:
            entry, was_sent = _back_up(source, target, staging, bar)
            files.append(entry)
            if was_sent:
                sent.append(entry)
        target.write(MANIFEST, _manifest(files, folder))
    kept = {f.object for f in files}
    target.remove([name for name in target.names(OBJECTS) if name not in kept])
    return BackupReport(
        destination=target.describe(),
        files=files,
        sent=len(sent),
        bytes_sent=sum(f.bytes for f in sent),
        seconds=time.monotonic() - started,
    )


def _back_up(
    source: Path, target: Destination, staging: Path, bar: Progress
) -> tuple[BackupFile, bool]:
    """Copy, describe, seal and send one file; whether it was sent."""
    work = staging / secrets.token_hex(4)  # a folder of its own: `describe` reads all of it
    work.mkdir()
    copy = work / source.name
    try:
        snapshot.copy(source, copy, bar.add)
        facts = snapshot.describe(work).get(source.name) or snapshot.Facts(None)
        snapshot.seal(copy)
        entry = BackupFile(
            name=source.name,
            bytes=copy.stat().st_size,
            sha256=_digest(copy),
            schema=facts.schema,
            entries=facts.entries,
            model=facts.model,
            dimension=facts.dimension,
            model_revision=facts.model_revision,
        )
        upload = bar.add if target.remote else _ignore
        if target.has(entry.object, entry.bytes):
            upload(entry.bytes)
            return entry, False
        target.put(entry.object, copy, upload)
        return entry, True
    finally:
        shutil.rmtree(work, ignore_errors=True)


def restore(
    store: Store,
    where: str | os.PathLike[str],
    *,
    force: bool = False,
    show_progress: bool = False,
) -> RestoreReport:
    """Restore the backup at ``where`` into the store's folder: see the module's docstring.

    Raises:
        InvalidInputError: a database cache (use pg_restore), or a source of another kind.
        BackupError: no backup there, a file that fails its checks (nothing is put in place),
            or a cache folder that holds files and ``force`` not given.
        StorageError: a restored file could not be upgraded.
    """
    folder = _folder(store, "pg_restore")
    source = destination(where)
    created_at, files = _read_manifest(source)
    _refuse_unless(force, folder)
    store.close()  # let go of the files about to be replaced; the next use opens them anew
    staging = folder / f".restore-{secrets.token_hex(4)}"
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise BackupError(f"cannot write to the cache folder {folder}: {exc}") from exc
    try:
        with Progress(sum(f.bytes for f in files), enabled=show_progress, unit="B") as bar:
            for entry in files:
                source.get(entry.object, staging / entry.name, bar.add)
                _check(entry, staging / entry.name, source)
        _refuse_unless(force, folder)  # a process may have created one meanwhile
        replaced = snapshot.cache_files(folder)
        for old in replaced:
            snapshot.remove(old)
        for entry in files:
            # A log left beside a missing file would be read into the restored one.
            snapshot.remove(folder / entry.name)
            os.replace(staging / entry.name, folder / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    store.migrate()  # the usual migrations, for a backup of an older schema
    schemas = snapshot.revisions(store)
    return RestoreReport(
        source=source.describe(),
        cache_dir=str(folder),
        created_at=created_at,
        files=files,
        upgraded=[f.name for f in files if schemas.get(f.name, f.schema) != f.schema],
        replaced=[p.name for p in replaced],
    )


def _folder(store: Store, tool: str) -> Path:
    layout = store.layout
    if not isinstance(layout, SQLiteLayout):
        raise InvalidInputError(
            f"backup and restore copy a SQLite cache folder; a database cache "
            f"({layout.describe()}) is backed up and restored with the database's own tools: "
            f"{tool} (see docs/recipes.md, 'Backing up a Postgres cache')"
        )
    return layout.directory


def _refuse_unless(force: bool, folder: Path) -> None:
    present = snapshot.cache_files(folder)
    if present and not force:
        names = ", ".join(p.name for p in present[:3]) + (", ..." if len(present) > 3 else "")
        raise BackupError(
            f"the cache folder {folder} holds files ({names}): a restore would replace them; "
            "pass force=True (embeddingcache restore --force) to replace them, or restore "
            "into an empty folder"
        )


def _check(entry: BackupFile, path: Path, source: Destination) -> None:
    """Raise `BackupError` unless the fetched file is the one the manifest describes and
    SQLite finds nothing wrong with it."""
    where = f"{entry.name} in the backup at {source.describe()}"
    size = path.stat().st_size
    if size != entry.bytes:
        raise BackupError(
            f"{where} is {size} bytes, not the {entry.bytes} its manifest says: truncated or "
            "damaged; nothing was restored"
        )
    if _digest(path) != entry.sha256:
        raise BackupError(
            f"{where} does not match the SHA-256 its manifest says: damaged; nothing was restored"
        )
    found = snapshot.problem(path)
    if found is not None:
        raise BackupError(f"{where} fails SQLite's integrity check ({found}); nothing was restored")


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_READ):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(files: list[BackupFile], folder: Path) -> bytes:
    document = {
        "format": FORMAT,
        "version": VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "library_version": __version__,
        "source": str(folder),
        "files": [dataclasses.asdict(f) for f in files],
    }
    return json.dumps(document, indent=2).encode("utf-8")


def _read_manifest(source: Destination) -> tuple[str, list[BackupFile]]:
    """When the backup at ``source`` was taken, and its files.

    Raises:
        BackupError: no manifest there, or one that is not sound.
    """
    data = source.read(MANIFEST)
    if data is None:
        raise BackupError(f"no backup at {source.describe()}: it has no {MANIFEST}")
    try:
        document = json.loads(data)
        if document.get("format") != FORMAT or document.get("version") != VERSION:
            raise ValueError(f"not an {FORMAT} manifest of version {VERSION}")
        files = [_entry(item) for item in document["files"]]
        created_at = str(document["created_at"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BackupError(
            f"the {MANIFEST} at {source.describe()} is not sound ({exc}); nothing was restored"
        ) from exc
    if len({f.name for f in files}) != len(files):
        raise BackupError(f"the {MANIFEST} at {source.describe()} names a file twice")
    return created_at, files


def _entry(item: Any) -> BackupFile:
    entry = BackupFile(**item)
    if not _NAME.fullmatch(entry.name) or ".." in entry.name:
        raise ValueError(f"{entry.name!r} is not the name of a cache file")
    if not _DIGEST.fullmatch(str(entry.sha256)):
        raise ValueError(f"{entry.name}: {entry.sha256!r} is not a SHA-256 in hex")
    if isinstance(entry.bytes, bool) or not isinstance(entry.bytes, int) or entry.bytes < 0:
        raise ValueError(f"{entry.name}: {entry.bytes!r} is not a size")
    return entry


def _ignore(_: int) -> None:
    """A progress callback that shows nothing."""
