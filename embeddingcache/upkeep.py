"""The upkeep half of `EmbeddingCache`: what the store holds, and keeping it (its schema,
pruning, export and import, backup and restore). A base class of the cache, apart from the
calls that embed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from . import backup as backups
from ._util import positive_int
from .backup import BackupReport, RestoreReport
from .errors import InvalidInputError
from .models import ModelSpec
from .storage import ShardSummary
from .storage.evict import PruneReport
from .storage.timeouts import unbounded
from .transfer import ExportReport, ImportReport, export_shard, import_file

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .storage import Store

__all__ = ["CacheContents", "Upkeep"]

MAX_AGE_S = 1000 * 365 * 86400  # an age beyond this means "everything", and overflows dates


@dataclass(frozen=True)
class CacheContents:
    """What `EmbeddingCache.contents` reports."""

    location: str
    texts: int
    shards: list[ShardSummary]


class Upkeep:
    """`EmbeddingCache`'s methods over its store as a whole; see there. On Postgres they run
    without the statement and lock timeouts (`storage.timeouts.unbounded`): a big shard's
    prune, count or export takes as long as it takes."""

    _store: Store
    pipeline: Pipeline

    def _spec(self, model: str | None) -> ModelSpec:
        """The identity of a model name (`EmbeddingCache.model_spec`)."""
        raise NotImplementedError

    def migrate(self) -> list[str]:
        """Bring the stored tables to this version's schema (opening them does it too).

        Returns the names of the places (files or schemas) found and now current.
        """
        with unbounded():
            return self._store.migrate()

    def contents(self) -> CacheContents:
        """What the storage holds: its location, the number of texts, and each model shard."""
        with unbounded():
            return CacheContents(
                location=self._store.layout.describe(),
                texts=self._store.text_count(),
                shards=self._store.summaries(),
            )

    def prune(
        self,
        *,
        model: str | None = None,
        older_than: float | timedelta | None = None,
        max_size: int | None = None,
        dry_run: bool = False,
        stale_versions: bool = False,
    ) -> PruneReport:
        """Remove entries, and the texts no model refers to any longer.

        ``model`` alone removes all of that model's vectors, every version of it (and frees
        its name for a model of another dimension); with another option it limits the
        removal to that model. ``stale_versions`` alone removes the shards of model versions
        whose weights no longer exist (a folder fine-tuned since, a Hub snapshot deleted:
        see docs/storage.md).
        ``older_than`` (seconds, or a ``timedelta``) removes entries unused for that long; last
        use is known to the day. ``max_size`` then removes the least recently used entries
        until the cache takes at most that many bytes on disk (SQLite only). SQLite files are
        compacted afterwards. ``dry_run`` says what would go and removes nothing.

        Raises:
            InvalidInputError: nothing to prune by, a model with nothing stored, a negative
                age, or ``max_size`` on a database.
            StorageError: the cache could not be read or written.
        """
        age = _checked_age(older_than)
        if max_size is not None:
            positive_int(max_size, "max_size")
        if stale_versions:
            if model is not None or age is not None or max_size is not None:
                raise InvalidInputError("stale_versions=True prunes alone: call prune again")
            with unbounded():
                stale = self.pipeline.stale_versions()
                return self.pipeline.prune(shards=stale, dry_run=dry_run)
        name = self._spec(model).name if model is not None else None
        with unbounded():
            return self.pipeline.prune(
                model=name, older_than_s=age, max_size=max_size, dry_run=dry_run
            )

    def export_to(self, path: str | os.PathLike[str], model: str | None = None) -> ExportReport:
        """Write one model's texts and vectors to a portable file (JSON lines; gzip when the
        name ends in ``.gz``); see `embeddingcache.transfer` for the format.

        Raises:
            InvalidInputError: nothing is stored for the model.
            StorageError: the cache could not be read.
            OSError: the file could not be written.
        """
        spec = self._spec(model)
        with unbounded():
            return export_shard(self._store, spec.name, path)

    def import_from(self, path: str | os.PathLike[str]) -> ImportReport:
        """Add the entries of a file written by `export_to` that this cache lacks. The
        whole file is checked before anything is written; a stored vector is never replaced.

        Raises:
            InvalidInputError: the file is not a sound export (the message names the line).
            ShardMismatchError: the cache holds another model under that model's slug.
            DimensionMismatchError: the cache holds vectors of another dimension for it.
            StorageError: the cache could not be written.
            OSError: the file could not be read.
        """
        report = import_file(self._store, path)
        self.pipeline.keep_within()
        return report

    def backup(
        self, destination: str | os.PathLike[str], *, show_progress: bool = False
    ) -> BackupReport:
        """Back up every file of this SQLite cache to a folder or to ``s3://bucket/prefix``,
        while other processes read and write it: each file is copied as of one moment
        (SQLite's online backup API; writers do not wait for it), checked, and listed in a
        manifest (``manifest.json``: sizes, SHA-256, schema revisions, models, counts). A file
        already at the destination unchanged is not sent again. An S3-compatible store is
        reached through boto3 (``pip install 'embeddingcache[s3]'``), with its endpoint and
        credentials taken the way boto3 takes them (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``...)
        and never shown. ``show_progress`` draws a bar of the bytes on stderr. See
        docs/recipes.md, "Backing up a cache".

        Raises:
            InvalidInputError: a database cache (back it up with pg_dump), a destination URL
                of another scheme than ``s3://``, or nothing stored yet.
            BackupError: the destination could not be written (or boto3 is not installed).
            StorageError: a file of the cache could not be copied.
        """
        return backups.backup(self._store, destination, show_progress=show_progress)

    def restore(
        self,
        source: str | os.PathLike[str],
        *,
        force: bool = False,
        show_progress: bool = False,
    ) -> RestoreReport:
        """Restore the backup at ``source`` (a folder or ``s3://bucket/prefix`` written by
        `backup`) into this cache's folder. Every file is checked against the manifest (size,
        SHA-256) and with ``PRAGMA integrity_check`` before any is put in place; older schema
        revisions are then upgraded by the usual migrations. A folder that holds cache files
        is refused unless ``force``, which replaces them all (stop the processes that use it
        first). ``show_progress`` draws a bar of the bytes on stderr.

        Raises:
            InvalidInputError: a database cache (restore it with pg_restore), or a source
                URL of another scheme than ``s3://``.
            BackupError: no backup there, a file missing, truncated or damaged (nothing was
                put in place), the backup could not be read, or the folder holds files and
                ``force`` was not given.
            StorageError: a restored file could not be upgraded.
        """
        return backups.restore(self._store, source, force=force, show_progress=show_progress)


def _checked_age(older_than: float | timedelta | None) -> float | None:
    """`prune`'s ``older_than`` in seconds."""
    age = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
    if age is not None and (
        isinstance(age, bool)
        or not isinstance(age, (int, float))
        or not 0 <= age <= MAX_AGE_S  # NaN fails this too
    ):
        raise InvalidInputError(
            f"older_than must be an age from 0 to 1000 years, not {older_than!r}"
        )
    return age
