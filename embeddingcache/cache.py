"""EmbeddingCache: validate, normalize, key, look up, compute what is missing, store, return."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from ._util import first_non_finite, positive_int, warn
from .config import (
    resolve_cache_dir,
    resolve_db_url,
    resolve_model_name,
    resolve_remote_url,
    resolve_token,
)
from .errors import (
    AllProvidersFailedError,
    DimensionMismatchError,
    InvalidInputError,
    ProviderError,
    ShardMismatchError,
    StorageError,
    TextTooLongError,
)
from .keys import keys_of, normalizer, validate_texts
from .models import ModelSpec, resolve_model
from .providers import Provider

if TYPE_CHECKING:
    import torch

    from .providers.remote import RemoteProvider
from .storage import Lookup, ShardSummary, Store, layout_for
from .storage.evict import PruneReport, prune
from .transfer import ExportReport, ImportReport, export_shard, import_file

__all__ = ["EmbeddingCache"]

logger = logging.getLogger("embeddingcache")

PROVIDERS = ("local", "remote")
DTYPES: dict[str, type[np.floating[Any]]] = {"float32": np.float32, "float64": np.float64}
# Rows per write transaction: big enough to amortize the commit, small enough that a writer
# holds the SQLite lock for a short while only.
WRITE_BATCH = 2000
# With max_size, a cache that outgrows it is pruned to this share of it, so that pruning
# (and compacting the files) happens once per tenth of the budget written, not per write.
LOW_WATER = 0.9
MAX_AGE_S = 1000 * 365 * 86400  # an age beyond this means "everything", and overflows dates

Dtype = Literal["float32", "float64"]
Output = Literal["numpy", "list", "torch"]
OUTPUTS: tuple[str, ...] = ("numpy", "list", "torch")


@dataclass(frozen=True)
class CacheContents:
    """What `EmbeddingCache.contents` reports."""

    location: str
    texts: int
    shards: list[ShardSummary]


class EmbeddingCache:
    """A read-through cache of text embeddings.

    Every distinct embedded string (the normalized text with the model's prompt in front) is
    computed once per model and then read from storage: SQLite files in ``cache_dir`` by default.

    Args:
        model: the default model of this cache's calls; a catalog name
            (``nomic-embed-text-v2``, ``all-MiniLM-L6-v2``), a Hugging Face id or a local
            model folder. Default: ``EMBEDDING_CACHE_MODEL``, else ``nomic-embed-text-v2``.
        cache_dir: directory of the SQLite files. Default: ``EMBEDDING_CACHE_DIR``, else
            ``~/.cache/embedding-cache``.
        db_url: a database URL to hold the cache instead (``EMBEDDING_CACHE_DB_URL``).
        remote_url: an ``embeddingcache serve`` backend (``EMBEDDING_CACHE_URL``); ``False``
            turns it off even when the variable is set.
        fallback_providers: who computes misses, in order: ``"local"``, ``"remote"``.
        normalize: the default normalization policy: ``"strip"``, ``"lower"`` or ``"none"``.
        timeout: seconds to wait for the remote backend (each request; 5 by default).
        token: the backend's bearer token (``EMBEDDING_CACHE_TOKEN``).
        push: offer the vectors computed here to the backend (it must run with
            ``--allow-push``); a failed push is logged, never raised.
        batch_size: texts per forward pass of the local model.
        device: ``"cpu"``, ``"cuda"``, ``"mps"``...; default: the best one available.
        max_size: a budget in bytes on disk for a SQLite cache directory: when a write takes
            the cache over it, the least recently used entries are removed until it takes
            90% of it (see `prune`).

    Raises:
        InvalidInputError: an unknown provider or normalization policy, or ``max_size``
            with a database URL.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        db_url: str | None = None,
        remote_url: str | bool | None = None,
        fallback_providers: Sequence[str] = PROVIDERS,
        normalize: str = "strip",
        timeout: float = 5.0,
        token: str | None = None,
        push: bool = False,
        batch_size: int = 32,
        device: str | None = None,
        max_size: int | None = None,
    ) -> None:
        self.model = resolve_model_name(model)
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.db_url = resolve_db_url(db_url)
        self.remote_url = resolve_remote_url(remote_url)
        unknown = [p for p in fallback_providers if p not in PROVIDERS]
        if isinstance(fallback_providers, str) or unknown:
            raise InvalidInputError(
                f"unknown fallback provider(s) {unknown or fallback_providers!r}; "
                f"choose from {', '.join(PROVIDERS)}"
            )
        self.fallback_providers = tuple(fallback_providers)
        normalizer(normalize)  # fail now on an unknown policy
        self.normalize = normalize
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise InvalidInputError(
                f"timeout must be a positive number of seconds, not {timeout!r}"
            )
        self.timeout = float(timeout)
        self.token = resolve_token(token)
        self.push = bool(push)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.device = device
        if max_size is not None:
            positive_int(max_size, "max_size")
            if self.db_url is not None:
                raise InvalidInputError(
                    "max_size needs a SQLite cache directory; a shared database is pruned "
                    "by whoever runs it (embeddingcache prune --older-than / --model)"
                )
        self.max_size = max_size
        self._pruning = threading.Lock()
        self._storage_worked = False  # it was read from or written to: see _degrades
        self._store = Store(layout_for(self.cache_dir, self.db_url))
        self._providers: dict[str, Provider] = {}
        self._remote_provider: RemoteProvider | None = None
        self._dimensions: dict[str, int] = {}  # of models loaded by dimension()
        self._lock = threading.Lock()
        self._stats = {"hits": 0, "misses": 0, "remote_hits": 0, "computed": 0, "pushed": 0}

    # -- public API -----------------------------------------------------------------------

    @overload
    def get_embeddings(
        self,
        texts: str | Sequence[str],
        model: str | None = None,
        *,
        normalize: str | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
        normalize_embeddings: bool = False,
        dimensions: int | None = None,
        dtype: Dtype = "float32",
        truncate: bool = False,
        prompt_name: str | None = None,
        prompt: str | None = None,
        output: Literal["numpy"] = "numpy",
    ) -> np.ndarray: ...

    @overload
    def get_embeddings(
        self,
        texts: str | Sequence[str],
        model: str | None = None,
        *,
        normalize: str | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
        normalize_embeddings: bool = False,
        dimensions: int | None = None,
        dtype: Dtype = "float32",
        truncate: bool = False,
        prompt_name: str | None = None,
        prompt: str | None = None,
        output: Literal["list"],
    ) -> list[float] | list[list[float]]: ...

    @overload
    def get_embeddings(
        self,
        texts: str | Sequence[str],
        model: str | None = None,
        *,
        normalize: str | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
        normalize_embeddings: bool = False,
        dimensions: int | None = None,
        dtype: Dtype = "float32",
        truncate: bool = False,
        prompt_name: str | None = None,
        prompt: str | None = None,
        output: Literal["torch"],
    ) -> torch.Tensor: ...

    def get_embeddings(
        self,
        texts: str | Sequence[str],
        model: str | None = None,
        *,
        normalize: str | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
        normalize_embeddings: bool = False,
        dimensions: int | None = None,
        dtype: Dtype = "float32",
        truncate: bool = False,
        prompt_name: str | None = None,
        prompt: str | None = None,
        output: Output = "numpy",
    ) -> np.ndarray | list[float] | list[list[float]] | torch.Tensor:
        """Embeddings of ``texts``, computed only for what the cache does not hold.

        Returns a ``(dim,)`` array for a ``str`` and an ``(n, dim)`` array, in input order,
        for a sequence; ``output="list"`` gives Python lists instead, ``output="torch"`` a
        tensor. ``dimensions`` (keep the first ones, for Matryoshka models),
        ``normalize_embeddings`` (unit length, after ``dimensions``) and ``dtype`` are applied
        on read: the stored vector is always the model's raw float32 output. ``prompt_name``
        picks one of the model's prompts (``"document"``, the default, or ``"query"`` for
        nomic-embed-text-v2); ``prompt`` gives the prefix itself instead (``""`` for none),
        as sentence-transformers' ``encode(prompt=...)`` does. Either way the prompt is part
        of the embedded string, hence of the key.

        Raises:
            InvalidInputError: a text is ``None``, empty or whitespace only (a ``ValueError``).
            InvalidInputTypeError: a text is not a ``str`` (a ``TypeError``).
            TextTooLongError: a text is longer than the model accepts, ``truncate`` false.
            AllProvidersFailedError: vectors were missing and nobody could compute them.
            StorageError: the cache could not be read or written, and never could in this
                process (once it has worked, a fault is an ``EmbeddingCacheWarning`` and the
                call returns computed vectors); or a shard of another model or dimension.
        """
        items, single = validate_texts(texts)
        if output not in OUTPUTS:
            raise InvalidInputError(
                f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}"
            )
        if dimensions is not None:
            positive_int(dimensions, "dimensions")
        spec = resolve_model(model if model is not None else self.model)
        norm = normalizer(normalize if normalize is not None else self.normalize)
        out_dtype = _dtype(dtype)
        batch = (
            positive_int(batch_size, "batch_size") if batch_size is not None else self.batch_size
        )
        prefix = _prompt_prefix(spec, prompt_name, prompt)

        normalized = list(map(norm, items))
        result, _ = self._resolve(
            spec,
            normalized,
            prefix,
            batch_size=batch,
            show_progress=show_progress,
            truncate=truncate,
        )
        if dimensions is not None and result.size:
            if dimensions > result.shape[1]:
                raise InvalidInputError(
                    f"dimensions={dimensions}, but model {spec.name!r} gives "
                    f"{result.shape[1]}-d vectors"
                )
            result = np.ascontiguousarray(result[:, :dimensions])
        if normalize_embeddings:
            norms = np.linalg.norm(result, axis=1, keepdims=True)
            np.divide(result, norms, out=result, where=norms > 0)
        if out_dtype is not np.float32:
            result = result.astype(out_dtype)
        if single:
            result = result[0]
        if output == "list":
            listed: list[float] | list[list[float]] = result.tolist()
            return listed
        if output == "torch":
            return _to_torch(result)
        return result

    def embed(
        self, text_or_texts: str | Sequence[str], model: str | None = None, **options: Any
    ) -> list[float] | list[list[float]]:
        """Like `get_embeddings`, as Python floats: a list for a ``str``, a list of
        lists for a sequence."""
        if "output" in options:
            raise InvalidInputError(
                "embed() always returns lists; for another output use get_embeddings(output=...)"
            )
        vectors: list[float] | list[list[float]] = self.get_embeddings(
            text_or_texts, model, **options, output="list"
        )
        return vectors

    async def aget_embeddings(
        self, texts: str | Sequence[str], model: str | None = None, **options: Any
    ) -> Any:
        """`get_embeddings` for async code, returning what it returns: it runs in a
        worker thread (the cache is thread-safe), so neither a hit nor a model computing
        blocks the event loop."""
        return await asyncio.to_thread(
            functools.partial(self.get_embeddings, **options), texts, model
        )

    async def aembed(
        self, text_or_texts: str | Sequence[str], model: str | None = None, **options: Any
    ) -> list[float] | list[list[float]]:
        """`embed` for async code, in a worker thread."""
        return await asyncio.to_thread(self.embed, text_or_texts, model, **options)

    def dimension(self, model: str | None = None) -> int:
        """The dimension of a model's vectors: from its shard, else from loading the model.

        Raises:
            DimensionMismatchError: the shard holds vectors of another dimension than the
                loaded model gives (the shard was filled by another model of that name).
            ProviderError: the model is not stored and cannot be loaded here.
        """
        spec = resolve_model(model if model is not None else self.model)
        from .providers.local import LocalProvider

        local = self._provider("local")
        assert isinstance(local, LocalProvider)
        loaded = local.dimension(spec)
        stored = self._known_dimension(spec)
        if self._store.info(spec.name) is not None and stored != loaded:
            raise DimensionMismatchError(
                f"model {spec.name!r} gives {loaded}-d vectors but its shard holds {stored}-d"
            )
        with self._lock:
            self._dimensions[spec.name] = loaded
        return loaded

    def migrate(self) -> list[str]:
        """Bring the stored tables to this version's schema (opening them does it too).

        Returns the names of the places (files or schemas) found and now current.
        """
        return self._store.migrate()

    def contents(self) -> CacheContents:
        """What the storage holds: its location, the number of texts, and each model shard."""
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
    ) -> PruneReport:
        """Remove entries, and the texts no model refers to any longer.

        ``model`` alone removes all of that model's vectors (and frees its name for a model of
        another dimension); with another option it limits the removal to that model.
        ``older_than`` (seconds, or a ``timedelta``) removes entries unused for that long; last
        use is known to the day. ``max_size`` then removes the least recently used entries
        until the cache takes at most that many bytes on disk (SQLite only). SQLite files are
        compacted afterwards. ``dry_run`` says what would go and removes nothing.

        Raises:
            InvalidInputError: nothing to prune by, a model with nothing stored, a negative
                age, or ``max_size`` on a database.
            StorageError: the cache could not be read or written.
        """
        age = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
        if age is not None and (
            isinstance(age, bool)
            or not isinstance(age, (int, float))
            or not 0 <= age <= MAX_AGE_S  # NaN fails this too
        ):
            raise InvalidInputError(
                f"older_than must be an age from 0 to 1000 years, not {older_than!r}"
            )
        if max_size is not None:
            positive_int(max_size, "max_size")
        name = resolve_model(model).name if model is not None else None
        with self._pruning:
            return prune(
                self._store, model=name, older_than_s=age, max_size=max_size, dry_run=dry_run
            )

    def export_to(self, path: str | os.PathLike[str], model: str | None = None) -> ExportReport:
        """Write one model's texts and vectors to a portable file (JSON lines; gzip when the
        name ends in ``.gz``); see `embeddingcache.transfer` for the format.

        Raises:
            InvalidInputError: nothing is stored for the model.
            StorageError: the cache could not be read.
            OSError: the file could not be written.
        """
        spec = resolve_model(model if model is not None else self.model)
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
        if self.max_size is not None:
            self._keep_within(self.max_size)
        return report

    @property
    def stats(self) -> dict[str, int]:
        """Counts over distinct texts per call: ``hits``, ``misses`` (not in the local cache),
        ``remote_hits`` (found by the backend), ``computed`` (by a provider) and ``pushed``
        (accepted by the backend)."""
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        """Release database connections and loaded models."""
        with self._lock:
            providers: list[Provider] = list(self._providers.values())
            if self._remote_provider is not None:
                providers.append(self._remote_provider)
            self._providers, self._remote_provider = {}, None
        for provider in providers:
            provider.close()
        self._store.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingCache(model={self.model!r}, storage={self._store.layout.describe()!r})"

    # -- the pipeline ---------------------------------------------------------------------

    def _resolve(
        self,
        spec: ModelSpec,
        normalized: list[str],
        prompt: str,
        *,
        compute: bool = True,
        batch_size: int | None = None,
        show_progress: bool = False,
        truncate: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The vectors of ``prompt + text`` for normalized texts, and which of them this
        cache's storage held (``None``: all of them).

        Looks in the storage, then asks the backend (lookup only), then, when ``compute``,
        runs the providers for the rest and stores what they return. Without ``compute``,
        the rows of vectors nobody had are zeros.
        """
        # Deduplicate: each distinct key is looked up, computed and counted once.
        embedded, keys, first = _keyed(normalized, prompt)
        unique_keys = list(first)
        inverse: np.ndarray | None = None  # None: every key is distinct, in input order
        if len(unique_keys) != len(keys):
            where = {key: u for u, key in enumerate(unique_keys)}
            inverse = np.fromiter((where[key] for key in keys), dtype=np.intp, count=len(keys))

        try:
            found = self._store.lookup(spec.name, unique_keys)
        except StorageError as exc:
            if not self._degrades(exc):
                raise
            # The storage that worked cannot be read now (a database gone, a file system
            # remounted): the caller still gets its vectors, computed; the next call tries again.
            _degraded(f"cannot read the cache ({exc}); computing the texts instead")
            found = Lookup.empty(self._known_dimension(spec))
        self._count_lookup(spec.name, len(found.positions), len(unique_keys) - len(found.positions))
        if len(found.positions) and not self._storage_worked:
            self._storage_worked = True
        if len(found.positions) == len(unique_keys) and unique_keys:
            # All stored: the lookup's rows are already in key order (the hot path).
            return (found.vectors if inverse is None else found.vectors[inverse]), None
        hit = np.zeros(len(unique_keys), dtype=bool)
        hit[found.positions] = True
        # (positions in unique_keys, their vectors), from each source in turn
        parts = [(found.positions, found.vectors)]
        missing = np.flatnonzero(~hit)
        damaged = {unique_keys[u] for u in found.damaged}

        def origins(positions: np.ndarray) -> list[int]:
            return [first[unique_keys[u]] for u in positions]

        if len(missing) and self.remote_url is not None:
            todo = origins(missing)
            answer = self._remote_lookup(spec, [normalized[i] for i in todo], prompt)
            if answer is not None:
                vectors, had = answer
                if had.any():
                    chosen = [i for i, h in zip(todo, had, strict=True) if h]
                    stored = self._store_rows(
                        spec,
                        [keys[i] for i in chosen],
                        [embedded[i] for i in chosen],
                        vectors[had],
                        damaged,
                    )
                    self._count(remote_hits=len(chosen))
                    parts.append((missing[had], stored))
                    missing = missing[~had]

        if len(missing) and compute:
            todo = origins(missing)
            vectors, provider = self._compute(
                spec,
                [normalized[i] for i in todo],
                origins=todo,
                prompt=prompt,
                batch_size=batch_size or self.batch_size,
                show_progress=show_progress,
                truncate=truncate,
            )
            vectors = self._store_rows(
                spec, [keys[i] for i in todo], [embedded[i] for i in todo], vectors, damaged
            )
            if self.push and provider == "local" and self.remote_url is not None:
                self._push(spec, [normalized[i] for i in todo], vectors, prompt)
            parts.append((missing, vectors))
            missing = missing[:0]

        dimensions = {v.shape[1] for p, v in parts if len(p)}
        if len(dimensions) > 1:
            raise DimensionMismatchError(
                f"model {spec.name!r} gave vectors of {sorted(dimensions)} dimensions"
            )
        dimension = dimensions.pop() if dimensions else self._known_dimension(spec)
        # Every row is filled below unless something stayed missing (lookup only).
        allocate = np.zeros if len(missing) else np.empty
        unique = allocate((len(unique_keys), dimension), dtype=np.float32)
        for positions, vectors in parts:
            if len(positions):
                unique[positions] = vectors
        if inverse is None:
            return unique, hit
        return unique[inverse], hit[inverse]

    def _adopt(
        self, spec: ModelSpec, normalized: list[str], prompt: str, vectors: np.ndarray
    ) -> int:
        """Store vectors computed elsewhere for texts not stored yet; the number stored.
        A stored vector is never replaced by an adopted one."""
        embedded, keys, first = _keyed(normalized, prompt)
        unique_keys = list(first)
        found = self._store.lookup(spec.name, unique_keys)
        stored = set(found.positions.tolist())
        todo = [first[key] for u, key in enumerate(unique_keys) if u not in stored]
        self._store_rows(
            spec, [keys[i] for i in todo], [embedded[i] for i in todo], vectors[todo], set()
        )
        return len(todo)

    def _compute(
        self,
        spec: ModelSpec,
        texts: list[str],
        *,
        origins: list[int],
        prompt: str,
        batch_size: int,
        show_progress: bool,
        truncate: bool,
    ) -> tuple[np.ndarray, str]:
        tried: list[str] = []
        fixes: list[str] = []  # what each failure's own cause calls for
        backend_helps = True
        for name in self.fallback_providers:
            provider = self._provider(name)
            if provider is None:
                tried.append(f"{name} (not configured)")
                continue
            try:
                vectors = provider.compute(
                    spec,
                    texts,
                    prompt=prompt,
                    batch_size=batch_size,
                    show_progress=show_progress,
                    truncate=truncate,
                )
            except TextTooLongError as exc:
                raise TextTooLongError(exc.detail, index=origins[exc.index]) from None
            except ProviderError as exc:
                logger.debug("provider %s failed: %s", name, exc)
                tried.append(f"{name} ({exc.reason})")
                fixes += [exc.fix] if exc.fix else []
                backend_helps = backend_helps and exc.backend_helps
                continue
            self._count(computed=len(texts))
            return vectors, name
        if "local" not in self.fallback_providers:
            fixes.append("add 'local' to fallback_providers to compute them here")
        there = (
            f"check the backend at {self.remote_url}"
            if self.remote_url is not None
            else "set remote_url (EMBEDDING_CACHE_URL) to an `embeddingcache serve` backend"
        )
        raise AllProvidersFailedError(
            f"cannot compute embeddings for model {spec.name!r}; tried: "
            f"{'; '.join(tried) or 'no provider'}. To fix: "
            f"{', or '.join([*fixes, there] if backend_helps else fixes)}."
        )

    def _remote_lookup(
        self, spec: ModelSpec, texts: list[str], prompt: str
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The backend's stored vectors of ``texts`` and which it had; ``None`` when it
        could not answer or answered vectors of another dimension than this cache holds."""
        remote = self._remote()
        if remote is None:
            return None
        try:
            vectors, had = remote.lookup(spec, texts, prompt=prompt)
        except ProviderError as exc:
            # A wrong or missing token is a mistake to point out; an absent backend is not.
            refused = getattr(exc, "status", None) in (401, 403)
            logger.log(logging.WARNING if refused else logging.DEBUG, "backend lookup: %s", exc)
            return None
        known = self._known_dimension(spec)
        if had.any() and known and vectors.shape[1] != known:
            logger.warning(
                "the backend at %s holds %d-d vectors for %r, this cache %d-d; ignoring them",
                self.remote_url,
                vectors.shape[1],
                spec.name,
                known,
            )
            return None
        return vectors, had

    def _push(self, spec: ModelSpec, texts: list[str], vectors: np.ndarray, prompt: str) -> None:
        remote = self._remote()
        if remote is None:
            return
        try:
            accepted = remote.push(spec, texts, vectors, prompt=prompt)
        except ProviderError as exc:
            # Pushing is a courtesy to the team; the caller already has its vectors.
            logger.warning("could not push %d vector(s) to the backend: %s", len(texts), exc)
            return
        self._count(pushed=accepted)

    def _store_rows(
        self,
        spec: ModelSpec,
        keys: list[bytes],
        texts: list[str],
        vectors: np.ndarray,
        damaged: set[bytes],
    ) -> np.ndarray:
        """Store fresh vectors (insert-or-ignore); return the vectors as stored.

        Another call may have stored some of these texts first, its vectors computed in
        another batch and so different in the last bits: the stored ones are returned, so
        that every caller gets the same vector for a text, always.
        """
        replaced = damaged.intersection(keys)
        if replaced:
            message = (
                f"{len(replaced)} stored vector(s) of model {spec.name!r} had the wrong "
                "length; recomputed and replaced them"
            )
            logger.warning(message)
            warn(message)
        bad = first_non_finite(vectors)
        if bad is not None:
            raise StorageError(
                f"model {spec.name!r} gave a vector with NaN or infinite values for "
                f"{texts[bad][:80]!r}; refusing to store or return it"
            )
        try:
            for start in range(0, len(keys), WRITE_BATCH):
                chunk = keys[start : start + WRITE_BATCH]
                self._store.put(
                    spec.name,
                    chunk,
                    texts[start : start + WRITE_BATCH],
                    vectors[start : start + WRITE_BATCH],
                    replace=[key for key in chunk if key in damaged],
                )
            stored = self._store.lookup(spec.name, keys)
            self._storage_worked = True
        except StorageError as exc:
            if not self._degrades(exc):
                raise
            # Each batch is one transaction: what was not stored is simply not there.
            _degraded(f"could not store {len(keys)} vector(s) ({exc}); returning them as computed")
            return np.asarray(vectors, dtype=np.float32)
        if self.max_size is not None:
            self._keep_within(self.max_size)
        if len(stored.positions) == len(keys):
            return stored.vectors
        vectors = np.array(vectors, dtype=np.float32)
        vectors[stored.positions] = stored.vectors
        return vectors

    def _degrades(self, exc: StorageError) -> bool:
        """Whether a call goes on without its storage after ``exc``: only when the storage
        worked before in this cache (a fault that came up, which may pass). A storage that never
        worked is more likely misconfigured (a wrong URL or password, a read-only directory):
        that is an error to fix. A shard of another model or dimension is always an error."""
        return self._storage_worked and not isinstance(
            exc, (ShardMismatchError, DimensionMismatchError)
        )

    def _keep_within(self, budget: int) -> None:
        """Prune the least recently used entries once the stored data outgrows ``budget``.
        A failure is a warning: the caller's vectors are stored, and the next write tries
        again."""
        try:
            if self._store.live_bytes() <= budget:
                return
            with self._pruning:  # one thread prunes; the others find the cache within budget
                if self._store.live_bytes() <= budget:
                    return
                report = prune(self._store, max_size=int(budget * LOW_WATER))
        except StorageError as exc:
            _degraded(f"could not prune the cache to max_size={budget} ({exc})")
            return
        logger.info(
            "the cache outgrew max_size=%d: removed the %d least recently used vector(s), "
            "%d -> %d bytes",
            budget,
            report.vectors_removed,
            report.bytes_before,
            report.bytes_after,
        )

    def _provider(self, name: str) -> Provider | None:
        if name == "remote":
            return self._remote()
        with self._lock:
            provider = self._providers.get(name)
            if provider is None:
                from .providers.local import LocalProvider

                provider = self._providers[name] = LocalProvider(device=self.device)
            return provider

    def _remote(self) -> RemoteProvider | None:
        if self.remote_url is None:
            return None
        with self._lock:
            if self._remote_provider is None:
                # httpx is imported by the first call that needs the backend.
                from .providers.remote import RemoteProvider

                self._remote_provider = RemoteProvider(
                    self.remote_url, timeout=self.timeout, token=self.token
                )
            return self._remote_provider

    def _known_dimension(self, spec: ModelSpec) -> int:
        info = self._store.info(spec.name)
        if info is not None:
            return info.dimension
        return self._dimensions.get(spec.name) or spec.dimension or 0

    def _count_lookup(self, model: str, hits: int, misses: int) -> None:
        with self._lock:
            stats = self._stats
            stats["hits"] += hits
            stats["misses"] += misses
        self._store.record(model, hits, misses)

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._stats[name] += amount


def _degraded(message: str) -> None:
    """Say that the cache could not do its part of a call that still succeeds."""
    logger.warning(message)
    warn(message)


def _to_torch(vectors: np.ndarray) -> torch.Tensor:
    try:
        import torch
    except ImportError:
        raise InvalidInputError(
            "output='torch' needs torch: pip install torch (or embeddingcache[local])"
        ) from None
    return torch.from_numpy(vectors)


def _prompt_prefix(spec: ModelSpec, prompt_name: str | None, prompt: str | None) -> str:
    """The prefix embedded before each text: ``prompt`` itself, else the named prompt."""
    if prompt is None:
        return spec.prompt(prompt_name)
    if not isinstance(prompt, str):
        raise InvalidInputError(f"prompt must be a str, not {type(prompt).__name__}")
    if prompt_name is not None:
        raise InvalidInputError(f"pass prompt_name={prompt_name!r} or prompt={prompt!r}, not both")
    return prompt


def _keyed(normalized: list[str], prompt: str) -> tuple[list[str], list[bytes], dict[bytes, int]]:
    """The embedded strings, their keys, and for each distinct key (in order of first
    appearance) the index of one text that has it."""
    embedded = [prompt + text for text in normalized] if prompt else normalized
    keys = keys_of(embedded)
    # A repeated key keeps its first place in the order and the index of its last
    # occurrence: either names the same text.
    return embedded, keys, dict(zip(keys, range(len(keys)), strict=True))


def _dtype(dtype: str) -> type[np.floating[Any]]:
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        raise InvalidInputError(
            f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}"
        ) from None
