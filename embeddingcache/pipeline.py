"""The read-through pipeline: one call's path from texts to stored vectors.

validate (the caller) -> normalize (the caller) -> `prepare`: embedded strings, keys,
duplicates -> `resolve`: look up, ask the backend, compute, store, count, as `Slice` objects
-> `vectors`: assembled in input order. `store` adds vectors computed elsewhere (a push to
the server, an import) under the same rules.

Every caller of the pipeline goes through these public calls: `EmbeddingCache`'s methods,
the server's ``/embed`` and ``/push``, and `embeddingcache.transfer`'s import
(`store_new`). The contract of a `Slice` (docs/architecture.md) is what the callers may rely on:
hits come first, then what the backend had (handed to the writer thread to store here, not
awaited: the backend still holds them), then computed slices, each stored before it is
yielded.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from ._util import Deferred, deferred_warnings, first_non_finite, warn
from .batching import plan, plan_count, token_bound
from .engines import EmbedOptions, Engine, EngineSettings, create
from .errors import (
    AllProvidersFailedError,
    DimensionMismatchError,
    InvalidInputError,
    ProviderError,
    ShardMismatchError,
    StorageError,
    TextTooLongError,
)
from .keys import keys_of
from .models import ModelSpec, resolve_model
from .storage import Lookup, Store
from .storage.evict import PruneReport, prune
from .storage.store import ReadOnlyStorageError
from .tokens import Costs, costs
from .versions import (
    PROBE,
    PROBE_TOLERANCE,
    model_of,
    probe_distance,
    probe_version,
    versioned_name,
)

if TYPE_CHECKING:
    from .engines.backend import BackendEngine

__all__ = [
    "CHAINS",
    "STORE_EVERY",
    "Call",
    "Pipeline",
    "Slice",
    "StoreEvery",
    "dedupe",
    "store_new",
]

logger = logging.getLogger("embeddingcache")

# Who computes misses: "local" is the model's own engine on this machine, "remote" the
# team backend computing.
CHAINS = ("local", "remote")
# How often a long-running process asks a model known by its answers (an API's) the probe again.
PROBE_EVERY_S = 3600.0
# How long the read path leaves a model alone after its probe failed (see Pipeline._probed).
PROBE_RETRY_S = 60.0
# How long the read path waits for a probe's answer: a hit is served meanwhile from the shard
# the model's recorded version names, so an API that hangs costs a hit this much, once.
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class StoreEvery:
    """When a call stores what it computed: once a slice holds ``vectors`` vectors, or has
    been computing for ``seconds``, whichever comes first (checked after each engine call of
    at most `STEP_BATCHES` batches). A call interrupted half way keeps every stored slice."""

    vectors: int = 4096
    seconds: float = 5.0


# The one setting of how often a call stores (issue 17): a few thousand vectors, or a few
# seconds of a slow model, whichever comes first.
STORE_EVERY = StoreEvery()
# Batches per engine call: the model sorts texts by length within a call, so fewer, larger
# calls waste less padding; more, smaller ones let the seconds threshold cut a slice sooner.
STEP_BATCHES = 16
# Writes of the backend's vectors a call hands over without waiting, at most: beyond that a
# call waits for the oldest, so that a long job of remote hits (iter_embeddings) holds a few
# chunks in memory, not every chunk the local disk has not caught up with.
REMOTE_WRITES_AHEAD = 2
# With max_size, a cache that outgrows it is pruned to this share of it, so that pruning
# (and compacting the files) happens once per tenth of the budget written, not per write.
LOW_WATER = 0.9

Source = Literal["hit", "remote", "computed"]


@dataclass(frozen=True)
class Slice:
    """Vectors for some of a call's distinct texts: ``positions`` index `Call.firsts`
    (the call's distinct keys), ``vectors`` are float32 ``(len(positions), dim)``, as stored
    (or as computed, when storing failed and the call degraded), and ``source`` says where
    they came from."""

    positions: np.ndarray
    vectors: np.ndarray
    source: Source


def dedupe(keys: Sequence[bytes]) -> tuple[list[int], np.ndarray | None]:
    """The one rule for duplicates: the index of the first occurrence of each distinct key,
    in order of first appearance, and for each key the position of its distinct key
    (``None`` when every key is distinct, the hot path)."""
    distinct = dict.fromkeys(keys)
    if len(distinct) == len(keys):
        return list(range(len(keys))), None
    where: dict[bytes, int] = {}
    firsts: list[int] = []
    inverse = np.empty(len(keys), dtype=np.intp)
    for i, key in enumerate(keys):
        u = where.get(key)
        if u is None:
            u = where[key] = len(firsts)
            firsts.append(i)
        inverse[i] = u
    return firsts, inverse


class Call:
    """One prepared request: the spec, the embedded strings, their keys and duplicates, and
    the shard of the model's version that answers it.

    ``version`` is the model's version (`embeddingcache.versions`), ``None`` when unknown;
    ``pinned`` says this machine's engine vouched for it, so that vectors of another version
    (a backend's) are refused rather than adopted. ``shard`` names the store's shard.
    """

    __slots__ = (
        "embedded",
        "firsts",
        "inverse",
        "keys",
        "normalized",
        "pinned",
        "prompt",
        "shard",
        "spec",
        "version",
    )

    def __init__(
        self,
        spec: ModelSpec,
        normalized: list[str],
        prompt: str,
        *,
        shard: str | None = None,
        version: str | None = None,
        pinned: bool = False,
    ) -> None:
        self.spec = spec
        self.shard = shard if shard is not None else spec.name
        self.version = version
        self.pinned = pinned
        self.normalized = normalized
        self.prompt = prompt
        self.embedded = [prompt + text for text in normalized] if prompt else normalized
        self.keys = keys_of(self.embedded)
        self.firsts, self.inverse = dedupe(self.keys)

    def distinct_keys(self, positions: Sequence[int] | np.ndarray | None = None) -> list[bytes]:
        keys, firsts = self.keys, self.firsts
        if positions is None:
            return keys if self.inverse is None else [keys[i] for i in firsts]
        return [keys[firsts[u]] for u in positions]


def store_new(
    store: Store,
    model: str,
    embedded: Sequence[str],
    vectors: np.ndarray,
) -> int:
    """Store vectors computed elsewhere for the embedded strings the shard lacks (a stored
    vector is kept; a damaged one, of the wrong length, is replaced); how many were new.
    A string repeated keeps its first vector.

    Raises:
        InvalidInputError: a vector holds NaN or infinite values (nothing is stored).
        StorageError: the shard could not be read or written (see `Store.put`).
    """
    bad = first_non_finite(vectors)
    if bad is not None:
        raise InvalidInputError(
            f"the vector of {embedded[bad][:80]!r} holds NaN or infinite values; nothing stored"
        )
    keys = keys_of(embedded)
    firsts, _ = dedupe(keys)
    distinct = [keys[i] for i in firsts]
    found = store.lookup(model, distinct)
    damaged = {distinct[u] for u in found.damaged}
    stored = np.zeros(len(distinct), dtype=bool)
    stored[found.positions] = True
    new = [firsts[u] for u in np.flatnonzero(~stored)]
    if not new:
        return 0
    if damaged:
        logger.warning("replacing %d damaged vector(s) of model %r", len(damaged), model)
    new_keys = [keys[i] for i in new]
    store.put(
        model,
        new_keys,
        [embedded[i] for i in new],
        np.asarray(vectors)[new],
        replace=[key for key in new_keys if key in damaged],
    )
    return len(new)


class Pipeline:
    """The read-through loop over one store, its engines and its backend (thread-safe)."""

    def __init__(
        self,
        store: Store,
        *,
        settings: EngineSettings,
        chain: Sequence[str] = CHAINS,
        push: bool = False,
        max_size: int | None = None,
        store_every: StoreEvery = STORE_EVERY,
    ) -> None:
        self.storage = store
        self.store_every = store_every
        self.settings = settings
        self.chain = tuple(chain)
        self.push = push
        self.max_size = max_size
        self.pruning = threading.Lock()  # one prune at a time
        self.storage_worked = False  # it was read from or written to: see degrades
        self._engines: dict[str, Engine] = {}
        self._backend: BackendEngine | None = None
        self._dimensions: dict[str, int] = {}  # of models whose engine said
        self._lock = threading.Lock()
        self._compute_locks: dict[str, threading.Lock] = {}
        self._refused: set[tuple[str, str]] = set()  # backend versions warned about
        self._probes: dict[str, tuple[str, float]] = {}  # model -> (version, when probed)
        self._unprobed: dict[str, float] = {}  # model -> when a probe last failed
        self._probing: dict[str, threading.Lock] = {}
        self._writer: ThreadPoolExecutor | None = None  # stores slices while the next computes
        self._remote_writes: list[Future[None]] = []  # the backend's vectors being stored
        self._stats = {
            "hits": 0,
            "misses": 0,
            "remote_hits": 0,
            "computed": 0,
            "pushed": 0,
            "tokens_computed": 0,
            "tokens_saved": 0,
        }
        self._tokens: dict[str, dict[str, int]] = {}  # model -> tokens computed and saved

    # -- the calls ------------------------------------------------------------------------

    def prepare(self, spec: ModelSpec, normalized: list[str], prompt: str) -> Call:
        """Key and dedupe normalized texts for ``spec`` with ``prompt`` in front, for the
        shard of the model's current version (checked at most once a second: see
        `shard_for`)."""
        version, pinned = self._version(spec, fresh=False)
        return Call(
            spec,
            normalized,
            prompt,
            shard=self._shard_of(spec, version),
            version=version,
            pinned=pinned,
        )

    # -- versions -------------------------------------------------------------------------

    def version(self, spec: ModelSpec, *, fresh: bool = False) -> str | None:
        """The model's current version here (see `shard_for`), ``None`` when unknown."""
        return self._version(spec, fresh=fresh)[0]

    def shard_for(self, spec: ModelSpec, *, fresh: bool = False) -> str:
        """The shard of the model's current version.

        A model's first version keeps its own shard (``spec.name``), recorded there the first
        time it is known (a shard of an earlier embeddingcache has none: it takes the one
        found now); every other version has a shard of its own (`versions.versioned_name`),
        so that a model fine-tuned in place, a Hub id at a new commit or a model replaced
        behind a backend never gets the vectors of another, and going back to earlier
        weights finds theirs again.
        """
        version, _ = self._version(spec, fresh=fresh)
        return self._shard_of(spec, version)

    def _version(self, spec: ModelSpec, *, fresh: bool) -> tuple[str | None, bool]:
        """The model's version and whether this machine's engine vouched for it (else it is
        the one the backend said last, or ``None``)."""
        if "local" in self.chain:
            try:
                engine = self.engine(spec)
            except InvalidInputError:
                engine = None  # no such engine here: the compute step says so
            if engine is not None and engine.versioned_by == "weights":
                version = engine.version(spec, fresh=fresh)
                if version is not None:
                    return version, True
            elif engine is not None and engine.versioned_by == "probe":
                version = self._probed(spec, engine, fresh=fresh)
                if version is not None:
                    return version, True
        remote = self.backend()
        return (remote.version(spec) if remote is not None else None), False

    def _probed(self, spec: ModelSpec, engine: Engine, *, fresh: bool) -> str | None:
        """The version of a model known only by its answers: its answers to `PROBE`, asked
        on the first call of this process and again every ``PROBE_EVERY_S``, matched within
        `PROBE_TOLERANCE` against the probe stored in each of its shards; a new version
        when none matches. ``None`` while the engine cannot answer (the shard's recorded
        version stands).

        A hit must not wait on an API that cannot be reached (offline, no key, hanging): on
        the read path the probe is asked once, without retries, waiting `PROBE_TIMEOUT_S` at
        most, and not again for `PROBE_RETRY_S` after it failed; before computing (``fresh``)
        it is asked with the engine's retries and timeout, since the texts are about to be
        sent anyway."""
        now = time.monotonic()
        with self._lock:
            known = self._probes.get(spec.name)
            failed_at = self._unprobed.get(spec.name)
            lock = self._probing.setdefault(spec.name, threading.Lock())
        if known is not None and now - known[1] < PROBE_EVERY_S:
            return known[0]
        if not fresh and failed_at is not None and now - failed_at < PROBE_RETRY_S:
            return known[0] if known is not None else None
        with lock:
            known = self._probes.get(spec.name)
            if known is not None and now - known[1] < PROBE_EVERY_S:
                return known[0]
            try:
                quick = EmbedOptions(retries=False, timeout_s=PROBE_TIMEOUT_S)
                options = EmbedOptions() if fresh else quick
                answers = engine.embed(spec, PROBE, prompt="", options=options)
            except ProviderError as exc:
                logger.warning("cannot probe model %r for its version: %s", spec.name, exc)
                with self._lock:
                    self._unprobed[spec.name] = time.monotonic()
                return known[0] if known is not None else None
            version = self._match_probe(spec, np.asarray(answers, dtype=np.float32))
            with self._lock:
                self._probes[spec.name] = (version, time.monotonic())
                self._unprobed.pop(spec.name, None)
            return version

    def _match_probe(self, spec: ModelSpec, answers: np.ndarray) -> str:
        """The version whose stored probe ``answers`` match, or a new one, stored with them."""
        keys = keys_of(list(PROBE))
        versions = sorted(
            s.model
            for s in self.storage.summaries()
            if s.model is not None and s.model != spec.name and model_of(s.model) == spec.name
        )
        shards = [spec.name, *versions]
        for shard in shards:
            info = self.storage.info(shard)
            if info is None or info.revision is None:
                continue
            found = self.storage.lookup(shard, keys)
            if len(found.positions) == len(keys) and (
                probe_distance(found.vectors, answers) <= PROBE_TOLERANCE
            ):
                return info.revision
        version = probe_version(answers)
        shard = self._shard_of(spec, version)
        if self.storage.info(shard) is None or shard == spec.name:
            self.storage.put(shard, keys, list(PROBE), answers, revision=version)
        return version

    def _shard_of(self, spec: ModelSpec, version: str | None) -> str:
        if version is None:
            return spec.name
        info = self.storage.info(spec.name)
        if info is None:
            # Nothing in the model's own shard (never, or pruned): a version that has a
            # shard of its own keeps it; a new one takes the model's.
            named = versioned_name(spec.name, version)
            return named if self.storage.info(named) is not None else spec.name
        if info.revision == version:
            return spec.name
        if info.revision is None and self.storage.claim_revision(spec.name, version) == version:
            return spec.name
        return versioned_name(spec.name, version)

    def stale_versions(self) -> list[str]:
        """The shards of model versions whose weights no longer exist where the model is
        loaded from (a folder holds only its latest weights; a Hub commit's snapshot was
        removed from the Hugging Face cache). Versions known by their answers are never
        stale: there is no telling."""
        stale = []
        for summary in self.storage.summaries():
            if summary.model is None or summary.revision is None:
                continue
            spec = resolve_model(model_of(summary.model))
            try:
                engine = self.engine(spec)
            except InvalidInputError:
                continue
            holds = getattr(engine, "holds", None)  # engines that load weights say
            if holds is not None and holds(spec, summary.revision) is False:
                stale.append(summary.model)
        return stale

    def _switch(self, call: Call, version: str | None) -> None:
        """Answer the rest of a call from the shard of ``version`` (a backend's)."""
        call.version = version
        call.shard = self._shard_of(call.spec, version)

    def resolve(
        self,
        call: Call,
        *,
        compute: bool = True,
        options: EmbedOptions | None = None,
    ) -> Iterator[Slice]:
        """The call's vectors as slices: the stored ones, then the backend's (lookup only,
        stored here by the writer thread, not awaited: see `_keep_remote`), then, when
        ``compute``, computed ones, each slice stored before it is yielded. Without
        ``compute``, what nobody had is in no slice.

        Raises:
            TextTooLongError: a text is too long for the model (``index`` in the call).
            AllProvidersFailedError: vectors were missing and nobody could compute them.
            StorageError: see `EmbeddingCache.get_embeddings`.
        """
        spec = call.spec
        distinct = call.distinct_keys()
        found = self._lookup(call, distinct)
        n = len(distinct)
        if n and len(found.positions) == n:  # every text stored: the hit path, nothing more
            self._count_lookup(call.shard, n, 0, found.tokens)
            self.storage_worked = True
            yield Slice(found.positions, found.vectors, "hit")
            return
        if len(found.positions) < n and (compute or self.settings.remote_url is not None):
            # Before anything is fetched or computed, the model's version as its files say now.
            version, pinned = self._version(spec, fresh=True)
            if pinned and version != call.version:
                call.pinned, call.version = True, version
                call.shard = self._shard_of(spec, version)
                found = self._lookup(call, distinct)
        held = np.zeros(n, dtype=bool)
        held[found.positions] = True
        missing = np.flatnonzero(~held)
        damaged = {distinct[u] for u in found.damaged}

        answer = None
        if len(missing) and self.settings.remote_url is not None:
            shard = call.shard
            answer = self._remote_lookup(call, missing)
            if call.shard != shard:
                # The backend holds another version than the one this call looked up, and
                # this machine cannot tell which is current: the backend's is; start again.
                yield from self.resolve(call, compute=compute, options=options)
                return
        hits = len(found.positions)
        self._count_lookup(call.shard, hits, n - hits, found.tokens)
        if hits and not self.storage_worked:
            self.storage_worked = True
        if hits:
            yield Slice(found.positions, found.vectors, "hit")
        if hits == n:
            return
        if answer is not None:
            vectors, had = answer
            if had.any():
                positions = missing[had]
                self._keep_remote(call, positions, vectors, had, damaged)
                self._count(remote_hits=len(positions))
                # The backend's vectors as it holds them: the team's stored ones, which every
                # client of the backend gets (see `_keep_remote`). A copy: the writer stores
                # ``vectors`` while the caller may change the slice's in place.
                yield Slice(positions, vectors[had], "remote")
                missing = missing[~had]

        if not len(missing) or not compute:
            return
        options = options or EmbedOptions(batch_size=self.settings.batch_size)
        yield from self._computed(call, missing, options, damaged)

    def _keep_remote(
        self,
        call: Call,
        positions: np.ndarray,
        vectors: np.ndarray,
        had: np.ndarray,
        damaged: set[bytes],
    ) -> None:
        """Hand the backend's vectors of the distinct texts at ``positions`` (its answer's
        rows where ``had``) to the writer thread to store here, without waiting: the backend
        keeps them meanwhile, so a write that has not landed (or failed) costs a later call
        one more lookup there, never a vector. Storing them on the call's path took about 0.5 s
        of a 0.75 s call of 20,000 remote hits (issue 18).

        ``close`` waits for the write; a failure is logged, never raised into a later call.
        What the caller got is the backend's vector: if this cache stored another one for a
        text meanwhile (computed here, in the moment between its lookup and this write), the
        stored one is kept and served by later hits here, as insert-or-ignore keeps any
        stored vector; the two are the same model's, differing in the last bits at most."""
        keys = call.distinct_keys(positions)
        replace = damaged.intersection(keys) if damaged else set()
        if replace:
            _degraded(
                f"{len(replace)} stored vector(s) of model {call.spec.name!r} had the wrong "
                "length; replacing them with the backend's"
            )
        # The shard is the call's as it is now: the version the backend's vectors are of.
        into = (call.shard, call.version)
        with self._lock:
            self._remote_writes = [f for f in self._remote_writes if not f.done()]
            pending = self._remote_writes
            waiting = pending[: max(0, len(pending) - REMOTE_WRITES_AHEAD + 1)]
        for earlier in waiting:  # a long job of remote hits: memory stays bounded
            wait([earlier])
        future = self._writer_pool().submit(
            self._store_remote, call, positions, vectors, had, replace, into
        )
        future.add_done_callback(_log_failed_write)
        with self._lock:
            self._remote_writes.append(future)

    def _store_remote(
        self,
        call: Call,
        positions: np.ndarray,
        vectors: np.ndarray,
        had: np.ndarray,
        replace: set[bytes],
        into: tuple[str, str | None],
    ) -> None:
        rows = vectors if had.all() else vectors[had]
        # The caller is gone: what `_store_rows` would warn of, it has logged (a degraded
        # write) or the caller's thread announced (replacing damaged rows).
        with deferred_warnings():
            self._store_rows(call, positions, rows, replace, into, announce=False)

    def _lookup(self, call: Call, distinct: list[bytes]) -> Lookup:
        try:
            return self.storage.lookup(call.shard, distinct)
        except StorageError as exc:
            if not self.degrades(exc):
                raise
            # The storage that worked cannot be read now (a database gone, a file system
            # remounted): the caller still gets its vectors, computed; the next call tries again.
            _degraded(f"cannot read the cache ({exc}); computing the texts instead")
            return Lookup.empty(self.known_dimension(call.spec, call.shard))

    def _computed(
        self, call: Call, missing: np.ndarray, options: EmbedOptions, damaged: set[bytes]
    ) -> Iterator[Slice]:
        """The vectors of the distinct texts at ``missing``, computed once across calls: a
        call that needs texts another call is computing waits for it (the model's lock),
        then reads what it stored and computes only the rest (a server's concurrent
        requests, say)."""
        lock = self._computing(call.spec.name)
        waited = not lock.acquire(blocking=False)
        if waited:
            lock.acquire()
        try:
            # Only a call that waited can find texts stored meanwhile by this process; what
            # another process stores, `_store_rows` finds (and returns) when it writes.
            if waited:
                meanwhile, missing = self._stored_meanwhile(call, missing)
                if meanwhile is not None:
                    yield meanwhile
            if len(missing):
                yield from self._compute_slices(call, missing, options, damaged)
        finally:
            lock.release()

    def _compute_slices(
        self, call: Call, missing: np.ndarray, options: EmbedOptions, damaged: set[bytes]
    ) -> Iterator[Slice]:
        """Compute the distinct texts at ``missing`` in steps, cut into slices by
        `store_every`; each slice is stored by the writer thread while the next one computes,
        and yielded once stored. However the loop ends (an exception from the model, a
        ``KeyboardInterrupt``, the caller closing the generator), what was computed is
        stored before the exception goes on."""
        failed: list[tuple[str, ProviderError]] = []
        every = self.store_every
        steps, in_flight, each_from = self._steps(call, missing, options, failed)
        # Slices handed to the writer, oldest first: one is yielded once the next is
        # computed, so the write of one overlaps the computing of the next.
        writing: list[tuple[Future[tuple[np.ndarray, Deferred]], np.ndarray]] = []
        parts: list[tuple[np.ndarray, np.ndarray]] = []  # computed, not handed over yet
        held, started = 0, time.monotonic()
        engine: Engine | None = None
        computed = self._computed_steps(
            call,
            steps,
            options,
            failed,
            in_flight,
            lambda p, v, e: _wait_quietly(self._hand_over(call, [(p, v)], damaged, e)[0]),
        )
        try:
            for done_steps, (positions, vectors, engine) in enumerate(computed, 1):
                parts.append((positions, vectors))
                held += len(positions)
                if (
                    done_steps <= each_from
                    and held < every.vectors
                    and time.monotonic() - started < every.seconds
                ):
                    continue
                writing.append(self._hand_over(call, parts, damaged, engine))
                parts, held, started = [], 0, time.monotonic()
                while len(writing) > 1:
                    future, done = writing[0]
                    yield Slice(done, _finished(future), "computed")
                    del writing[0]
            if parts and engine is not None:
                writing.append(self._hand_over(call, parts, damaged, engine))
                parts = []
            while writing:
                future, done = writing[0]
                yield Slice(done, _finished(future), "computed")
                del writing[0]
        except BaseException:
            # Keep what was computed: store it before the error reaches the caller. A
            # failure to store it is logged; the caller sees the error that stopped the call.
            computed.close()  # the requests still in flight are stored as they end
            if parts and engine is not None:
                writing.append(self._hand_over(call, parts, damaged, engine))
            for future, _ in writing:
                _wait_quietly(future)
            raise

    def _steps(
        self,
        call: Call,
        missing: np.ndarray,
        options: EmbedOptions,
        failed: list[tuple[str, ProviderError]],
    ) -> tuple[list[np.ndarray], int, int]:
        """The positions of each engine call, how many may run at once, and from which call
        on each call's vectors are stored as they come: as the first engine of the chain can
        take them (its `Limits`). A model on this machine takes `STEP_BATCHES` batches per
        call, one call at a time, stored by `store_every`, and a call of more than a slice
        ends in calls of half the size each (`tapered`), each stored as it comes: what is
        left to store once the model is done is one batch, not a slice. An engine that
        bounds a batch by tokens (an API's, billed per token) takes one request's worth per
        call, ``in_flight`` at a time, so that requests run together, and each answer is
        stored as it comes: an interrupted (even killed) run keeps every vector it paid for.
        An engine that checks its inputs (``check_inputs``) sees them all first, before
        anything is sent."""
        lead = self._lead(call.spec)
        limits = lead.limits if lead is not None else None
        texts: list[str] | None = None
        check = getattr(lead, "check_inputs", None) if lead is not None else None
        if check is not None and lead is not self._backend:
            texts = [call.embedded[call.firsts[u]] for u in missing]
            try:
                check(call.spec, texts, truncate=options.truncate)
            except TextTooLongError as exc:
                raise TextTooLongError(exc.detail, index=call.firsts[missing[exc.index]]) from None
            except ProviderError as exc:  # it cannot compute these: the next engine may
                logger.debug("engine local cannot take these texts: %s", exc)
                failed.append(("local", exc))
        if limits is None or (limits.token_budget is None and limits.in_flight <= 1):
            step = max(1, min(self.store_every.vectors, options.batch_size * STEP_BATCHES))
            counted = list(plan_count(len(missing), most=step))
            each_from = len(counted) - 1  # the last call's vectors need no waiting for more
            if len(missing) > self.store_every.vectors:
                counted[-1:] = tapered(*counted[-1], batch=options.batch_size)
            return [missing[a:b] for a, b in counted], 1, each_from
        if texts is None:
            texts = [call.embedded[call.firsts[u]] for u in missing]
        ranges = plan(
            map(token_bound, texts),
            most=min(limits.batch_inputs, self.store_every.vectors),
            budget=limits.token_budget,
        )
        return [missing[a:b] for a, b in ranges], max(1, limits.in_flight), 0

    def _lead(self, spec: ModelSpec) -> Engine | None:
        """The first engine of the chain that is configured here (None: none is)."""
        for name in self.chain:
            if name == "remote":
                remote = self.backend()
                if remote is not None:
                    return remote
                continue
            try:
                return self.engine(spec)
            except InvalidInputError:
                continue  # no such engine here: the compute step says so
        return None

    def _computed_steps(
        self,
        call: Call,
        steps: list[np.ndarray],
        options: EmbedOptions,
        failed: list[tuple[str, ProviderError]],
        in_flight: int,
        rescue: Callable[[np.ndarray, np.ndarray, Engine], None],
    ) -> Generator[tuple[np.ndarray, np.ndarray, Engine], None, None]:
        """``(positions, vectors, engine)`` of each step, computed ``in_flight`` at a time, in
        the order they finish. When one fails (or this thread is interrupted while it
        waits), no other step is started, the steps already running are awaited and yielded
        (their vectors are paid for), and then the error goes on. When the caller stops
        taking them (its own error, an interrupt while it stores), the steps still running
        are awaited and handed to ``rescue``, which stores them."""
        if in_flight <= 1 or len(steps) <= 1:
            for positions in steps:
                vectors, engine = self._compute(call, positions, options, failed)
                yield positions, vectors, engine
            return
        pool = ThreadPoolExecutor(in_flight, thread_name_prefix="embeddingcache-compute")
        running: dict[Future[tuple[np.ndarray, Engine]], np.ndarray] = {}
        queue = iter(steps)
        error: BaseException | None = None
        try:
            for positions in itertools.islice(queue, in_flight):
                future = pool.submit(self._compute, call, positions, options, failed)
                running[future] = positions
            while running:
                try:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                except BaseException as exc:  # interrupted: finish what is running
                    error = error or exc
                    done, _ = wait(running)
                for future in done:
                    positions = running.pop(future)
                    try:
                        vectors, engine = future.result()
                    except BaseException as exc:
                        error = error or exc
                        continue
                    if error is None:
                        for following in itertools.islice(queue, 1):
                            running[
                                pool.submit(self._compute, call, following, options, failed)
                            ] = following
                    yield positions, vectors, engine
            if error is not None:
                raise error
        finally:
            if running:
                logger.info("storing the %d answer(s) still in flight", len(running))
            for future, positions in running.items():
                try:
                    vectors, engine = future.result()
                except BaseException:  # its error is not the one the caller must see
                    continue
                rescue(positions, vectors, engine)
            pool.shutdown(wait=False, cancel_futures=True)

    def _hand_over(
        self,
        call: Call,
        parts: list[tuple[np.ndarray, np.ndarray]],
        damaged: set[bytes],
        engine: Engine,
    ) -> tuple[Future[tuple[np.ndarray, Deferred]], np.ndarray]:
        """Give the writer thread a slice of computed parts to store (and push)."""
        positions = np.concatenate([p for p, _ in parts])
        vectors = parts[0][1] if len(parts) == 1 else np.concatenate([v for _, v in parts])
        writer = self._writer_pool()
        # The shard is the call's as it is now: the version these vectors were computed at.
        into = (call.shard, call.version)
        return writer.submit(
            self._store_slice, call, positions, vectors, damaged, engine, into
        ), positions

    def _writer_pool(self) -> ThreadPoolExecutor:
        """The one writer thread: stores in the order handed over, so a slice handed over
        after the backend's vectors is stored after them."""
        with self._lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="embeddingcache-writer")
            return self._writer

    def _store_slice(
        self,
        call: Call,
        positions: np.ndarray,
        vectors: np.ndarray,
        damaged: set[bytes],
        engine: Engine,
        into: tuple[str, str | None],
    ) -> tuple[np.ndarray, Deferred]:
        with deferred_warnings() as found:  # the caller's thread issues them
            # Counted here, on the writer thread, so that tokenizing overlaps the computing
            # of the next slice; by the engine that computed the slice (see tokens.costs).
            cost = costs(engine, call.spec, [call.embedded[call.firsts[u]] for u in positions])
            stored = self._store_rows(call, positions, vectors, damaged, into, cost)
            if cost[0] is not None:
                spent = sum(cost[0])
                with self._lock:
                    self._stats["tokens_computed"] += spent
                    self._tokens_of(call.spec.name)["computed"] += spent
            if self.push and self.settings.remote_url is not None and engine.kind != "backend":
                self._push(call, positions, stored, into[1])  # what the backend computed, it has
        return stored, found

    def vectors(
        self,
        call: Call,
        *,
        compute: bool = True,
        options: EmbedOptions | None = None,
        progress: Callable[[Slice], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The call's vectors in input order, and which of them the store held (``None``:
        all of them). Without ``compute``, the rows of vectors nobody had are zeros.
        ``progress`` is called with each slice as it comes (a progress bar's).
        Raises what `resolve` raises."""
        slices = self.resolve(call, compute=compute, options=options)
        if progress is not None:
            slices = _reported(slices, progress)
        first = next(slices, None)
        n = len(call.firsts)
        if first is not None and first.source == "hit" and len(first.positions) == n:
            # All stored: the lookup's rows are already in key order (the hot path).
            if call.inverse is None:
                return first.vectors, None
            return first.vectors[call.inverse], None
        parts = [first, *slices] if first is not None else []
        only = parts[0] if len(parts) == 1 else None
        if only is not None and only.source == "remote" and len(only.positions) == n:
            # Every text from the backend: its positions ascend (those the lookup missed),
            # so its rows (a copy of the answer's) are in key order already, as a lookup's.
            hit = np.zeros(n, dtype=bool)
            if call.inverse is None:
                return only.vectors, hit
            return only.vectors[call.inverse], hit[call.inverse]
        dimensions = {s.vectors.shape[1] for s in parts}
        if len(dimensions) > 1:
            raise DimensionMismatchError(
                f"model {call.spec.name!r} gave vectors of {sorted(dimensions)} dimensions"
            )
        dimension = dimensions.pop() if dimensions else self.known_dimension(call.spec, call.shard)
        filled = sum(len(s.positions) for s in parts)
        # Every row is filled below unless something stayed missing (lookup only).
        unique = (np.zeros if filled < n else np.empty)((n, dimension), dtype=np.float32)
        hit = np.zeros(n, dtype=bool)
        for part in parts:
            unique[part.positions] = part.vectors
            if part.source == "hit":
                hit[part.positions] = True
        if call.inverse is None:
            return unique, hit
        return unique[call.inverse], hit[call.inverse]

    def store(self, spec: ModelSpec, embedded: Sequence[str], vectors: np.ndarray) -> int:
        """Store vectors computed elsewhere for embedded strings not stored yet (see
        `store_new`); the number stored. Keeps the cache within ``max_size`` afterwards."""
        added = store_new(self.storage, self.shard_for(spec, fresh=True), embedded, vectors)
        self.storage_worked = True
        self.keep_within()
        return added

    # -- engines --------------------------------------------------------------------------

    def engine(self, spec: ModelSpec) -> Engine:
        """The engine of this machine that computes ``spec``'s vectors, created on first use.

        Raises:
            InvalidInputError: no engine of the spec's kind is registered.
        """
        with self._lock:
            engine = self._engines.get(spec.engine)
            if engine is None:
                engine = self._engines[spec.engine] = create(spec.engine, self.settings)
            return engine

    def loaded_engines(self) -> dict[str, Engine]:
        """The engines created so far, by kind (the backend's apart)."""
        with self._lock:
            return dict(self._engines)

    def backend(self) -> BackendEngine | None:
        """The team backend, when one is configured (httpx is imported on first use)."""
        if self.settings.remote_url is None:
            return None
        with self._lock:
            if self._backend is None:
                from .engines.backend import create as backend_engine

                self._backend = backend_engine(self.settings)
            return self._backend

    def dimension(self, spec: ModelSpec) -> int:
        """The dimension the model's engine gives, checked against its shard.

        Raises:
            DimensionMismatchError: the shard holds vectors of another dimension.
            ProviderError: the engine cannot load or reach the model.
        """
        loaded = self.engine(spec).dimension(spec)
        # One read of the sanity row: another process may create the shard meanwhile.
        info = self.storage.info(self.shard_for(spec))
        if info is not None and info.dimension != loaded:
            raise DimensionMismatchError(
                f"model {spec.name!r} gives {loaded}-d vectors but its shard holds "
                f"{info.dimension}-d"
            )
        with self._lock:
            self._dimensions[spec.name] = loaded
        return loaded

    def known_dimension(self, spec: ModelSpec, shard: str | None = None) -> int:
        """The model's dimension as known without loading it (from ``shard``, by default
        its current version's); 0 when unknown."""
        info = self.storage.info(shard if shard is not None else self.shard_for(spec))
        if info is not None:
            return info.dimension
        return self._dimensions.get(spec.name) or spec.dimension or 0

    # -- storage --------------------------------------------------------------------------

    def degrades(self, exc: StorageError) -> bool:
        """Whether a call goes on without its storage after ``exc``: only when the storage
        worked before in this cache (a fault that came up, which may pass). A storage that never
        worked is more likely misconfigured (a wrong URL or password, a read-only directory):
        that is an error to fix. A shard of another model or dimension is always an error."""
        if isinstance(exc, ReadOnlyStorageError):
            return True  # a cache on read-only media serves its hits; misses are computed
        return self.storage_worked and not isinstance(
            exc, (ShardMismatchError, DimensionMismatchError)
        )

    def prune(self, **options: object) -> PruneReport:
        """`embeddingcache.storage.evict.prune` of this store, one prune at a time."""
        with self.pruning:
            return prune(self.storage, **options)  # type: ignore[arg-type]

    def keep_within(self) -> None:
        """With ``max_size``, prune the least recently used entries once the stored data
        outgrows it. A failure is a warning: the caller's vectors are stored, and the next
        write tries again."""
        budget = self.max_size
        if budget is None:
            return
        try:
            if self.storage.live_bytes() <= budget:
                return
            with self.pruning:  # one thread prunes; the others find the cache within budget
                if self.storage.live_bytes() <= budget:
                    return
                report = prune(self.storage, max_size=int(budget * LOW_WATER))
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

    # -- counters -------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    @property
    def token_stats(self) -> dict[str, dict[str, int]]:
        """Per model, in this process: the tokens its computed vectors cost (``computed``)
        and the recorded tokens of its hits (``saved``); models with neither are left out."""
        with self._lock:
            return {model: dict(counts) for model, counts in self._tokens.items()}

    def close(self) -> None:
        """Close the engines and the backend client (not the store)."""
        with self._lock:
            engines: list[Engine] = list(self._engines.values())
            if self._backend is not None:
                engines.append(self._backend)
            self._engines, self._backend = {}, None
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)  # the slices handed over are stored
        for engine in engines:
            engine.close()

    # -- steps ----------------------------------------------------------------------------

    def _compute(
        self,
        call: Call,
        positions: np.ndarray,
        options: EmbedOptions,
        failed: list[tuple[str, ProviderError]],
    ) -> tuple[np.ndarray, Engine]:
        """Vectors of the distinct texts at ``positions`` from the first engine of the chain
        that computes them; an engine that failed earlier in the call (``failed``) is not
        asked again."""
        spec = call.spec
        origins = [call.firsts[u] for u in positions]
        texts = [call.normalized[i] for i in origins]
        tried: list[str] = []
        for name in self.chain:
            engine = self.backend() if name == "remote" else self.engine(spec)
            if engine is None:
                tried.append(f"{name} (not configured)")
                continue
            if any(seen == name for seen, _ in failed):
                continue
            try:
                vectors = engine.embed(spec, texts, prompt=call.prompt, options=options)
                if engine.versioned_by == "backend":
                    self._check_backend_version(call, engine)
            except TextTooLongError as exc:
                raise TextTooLongError(exc.detail, index=origins[exc.index]) from None
            except ProviderError as exc:
                logger.debug("engine %s failed: %s", name, exc)
                failed.append((name, exc))
                continue
            self._count(computed=len(texts))
            return vectors, engine
        raise self._all_failed(spec, tried, failed)

    def _all_failed(
        self, spec: ModelSpec, tried: list[str], failed: list[tuple[str, ProviderError]]
    ) -> AllProvidersFailedError:
        tried = [f"{name} ({exc.reason})" for name, exc in failed] + tried
        fixes = [exc.fix for _, exc in failed if exc.fix]  # what each failure's cause calls for
        backend_helps = all(exc.backend_helps for _, exc in failed)
        if "local" not in self.chain:
            fixes.append("add 'local' to fallback_providers to compute them here")
        url = self.settings.remote_url
        there = (
            f"check the backend at {url}"
            if url is not None
            else "set remote_url (EMBEDDING_CACHE_URL) to an `embeddingcache serve` backend"
        )
        return AllProvidersFailedError(
            f"cannot compute embeddings for model {spec.name!r}; tried: "
            f"{'; '.join(tried) or 'no provider'}. To fix: "
            f"{', or '.join([*fixes, there] if backend_helps else fixes)}."
        )

    def _remote_lookup(
        self, call: Call, positions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The backend's stored vectors of the distinct texts at ``positions`` and which it
        had; ``None`` when it could not answer or answered vectors of another dimension than
        this cache holds."""
        remote = self.backend()
        if remote is None:
            return None
        spec = call.spec
        texts = [call.normalized[call.firsts[u]] for u in positions]
        try:
            vectors, had = remote.lookup(spec, texts, prompt=call.prompt)
        except ProviderError as exc:
            # A wrong or missing token is a mistake to point out; an absent backend is not.
            refused = getattr(exc, "status", None) in (401, 403)
            logger.log(logging.WARNING if refused else logging.DEBUG, "backend lookup: %s", exc)
            return None
        theirs = remote.version(spec)
        if theirs is not None and theirs != call.version:
            if call.pinned:
                self._refuse_version(remote.url, spec, theirs, call.version)
                return None
            before = call.shard
            self._switch(call, theirs)
            if call.shard != before:
                return None  # the caller looks up again, in that version's shard
        known = self.known_dimension(spec, call.shard)
        if had.any() and known and vectors.shape[1] != known:
            logger.warning(
                "the backend at %s holds %d-d vectors for %r, this cache %d-d; ignoring them",
                remote.url,
                vectors.shape[1],
                spec.name,
                known,
            )
            return None
        return vectors, had

    def _push(
        self, call: Call, positions: np.ndarray, vectors: np.ndarray, version: str | None
    ) -> None:
        remote = self.backend()
        if remote is None:
            return
        texts = [call.normalized[call.firsts[u]] for u in positions]
        try:
            accepted = remote.push(call.spec, texts, vectors, prompt=call.prompt, version=version)
        except ProviderError as exc:
            # Pushing is a courtesy to the team; the caller already has its vectors.
            logger.warning("could not push %d vector(s) to the backend: %s", len(texts), exc)
            return
        self._count(pushed=accepted)

    def _check_backend_version(self, call: Call, remote: Engine) -> None:
        """After the backend computed: its vectors are of the call's version, or are refused
        (`ProviderError`: the next engine of the chain is asked)."""
        theirs = remote.version(call.spec)
        if theirs is None or theirs == call.version:
            return
        if call.version is None and not call.pinned:
            self._switch(call, theirs)  # the first version this call learns of
            return
        raise ProviderError(
            f"the backend computes model {call.spec.name!r} at version {theirs}, and this "
            f"call needs version {call.version}"
        )

    def _refuse_version(self, url: str, spec: ModelSpec, theirs: str, ours: str | None) -> None:
        key = (spec.name, theirs)
        with self._lock:
            if key in self._refused:
                return
            self._refused.add(key)
        logger.warning(
            "the backend at %s holds version %s of model %r, this machine's files version "
            "%s: not using its vectors",
            url,
            theirs,
            spec.name,
            ours,
        )

    def _computing(self, model: str) -> threading.Lock:
        with self._lock:
            return self._compute_locks.setdefault(model, threading.Lock())

    def _stored_meanwhile(
        self, call: Call, positions: np.ndarray
    ) -> tuple[Slice | None, np.ndarray]:
        """The vectors of ``positions`` stored since this call's lookup (by another call, as
        a slice read from the store), and the positions still to compute. Uncounted: the
        lookup counted these texts already."""
        try:
            found = self.storage.lookup(call.shard, call.distinct_keys(positions))
        except StorageError:
            return None, positions  # the compute that follows meets the storage's state
        if not len(found.positions):
            return None, positions
        keep = np.ones(len(positions), dtype=bool)
        keep[found.positions] = False
        return Slice(positions[found.positions], found.vectors, "hit"), positions[keep]

    def _store_rows(
        self,
        call: Call,
        positions: np.ndarray,
        vectors: np.ndarray,
        damaged: set[bytes],
        into: tuple[str, str | None] | None = None,
        cost: Costs = (None, True),
        *,
        announce: bool = True,
    ) -> np.ndarray:
        """Store fresh vectors of the distinct texts at ``positions`` (insert-or-ignore) in
        one `Store.put`, in the call's shard (or ``into``: the shard and version they were
        computed for), with what each cost in tokens (``cost``, see `tokens.costs`); return
        the vectors as stored.

        Another call may have stored some of these texts first, its vectors computed in
        another batch and so different in the last bits: the stored ones are returned, so
        that every caller gets the same vector for a text, always.
        """
        spec = call.spec
        keys = call.distinct_keys(positions)
        replace = [key for key in keys if key in damaged] if damaged else []
        if replace and announce:
            _degraded(
                f"{len(replace)} stored vector(s) of model {spec.name!r} had the wrong "
                "length; recomputed and replaced them"
            )
        bad = first_non_finite(vectors)
        if bad is not None:
            text = call.embedded[call.firsts[positions[bad]]]
            raise StorageError(
                f"model {spec.name!r} gave a vector with NaN or infinite values for "
                f"{text[:80]!r}; refusing to store or return it"
            )
        texts = [call.embedded[call.firsts[u]] for u in positions]
        shard, version = into if into is not None else (call.shard, call.version)
        try:
            tokens, exact = cost
            kept = self.storage.put(
                shard,
                keys,
                texts,
                vectors,
                replace=replace,
                revision=version,
                tokens=tokens,
                tokens_exact=exact,
            )
            # Read back only when another writer stored some first: when none was, the
            # vectors given are the ones stored (a read of every slice cost a tenth of a
            # fast model's time: issue 17).
            stored = self.storage.lookup(shard, keys) if kept else None
            self.storage_worked = True
        except StorageError as exc:
            if not self.degrades(exc):
                raise
            # A write transaction is all or nothing: what was not stored is simply not there.
            _degraded(f"could not store {len(keys)} vector(s) ({exc}); returning them as computed")
            return np.asarray(vectors, dtype=np.float32)
        self.keep_within()
        if stored is None:
            return np.asarray(vectors, dtype=np.float32)
        if len(stored.positions) == len(keys):
            return stored.vectors
        vectors = np.array(vectors, dtype=np.float32)
        vectors[stored.positions] = stored.vectors
        return vectors

    def _count_lookup(self, model: str, hits: int, misses: int, tokens_saved: int) -> None:
        with self._lock:
            stats = self._stats
            stats["hits"] += hits
            stats["misses"] += misses
            if tokens_saved:
                stats["tokens_saved"] += tokens_saved
                self._tokens_of(model_of(model))["saved"] += tokens_saved
        self.storage.record(model, hits, misses, tokens_saved)

    def _tokens_of(self, model: str) -> dict[str, int]:
        found = self._tokens.get(model)
        if found is None:
            found = self._tokens[model] = {"computed": 0, "saved": 0}
        return found

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._stats[name] += amount


def tapered(start: int, stop: int, *, batch: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into ranges of half the rest each, in whole batches, down to
    one batch: 4,096 texts in batches of 256 are 2,048, 1,024, 512, 256 and 256. Stored as
    each is computed, the last write overlaps nothing and is one batch long."""
    ranges = []
    batch = max(1, batch)
    while stop - start > 2 * batch:
        half = -(-(stop - start) // (2 * batch)) * batch  # half the rest, in whole batches
        ranges.append((start, start + half))
        start += half
    if stop - start > batch:
        ranges.append((start, start + batch))
        start += batch
    ranges.append((start, stop))
    return ranges


def _reported(slices: Iterator[Slice], progress: Callable[[Slice], None]) -> Iterator[Slice]:
    for part in slices:
        progress(part)
        yield part


def _finished(future: Future[tuple[np.ndarray, Deferred]]) -> np.ndarray:
    """A slice's stored vectors once written, its warnings issued on this thread."""
    stored, found = future.result()
    for message, category in found:
        warn(message, category)
    return stored


def _wait_quietly(future: Future[tuple[np.ndarray, Deferred]]) -> None:
    """Wait for a slice's write while another error is on its way to the caller."""
    try:
        _finished(future)
    except BaseException as exc:  # the other error is the one the caller must see
        logger.warning("could not store a computed slice: %s", exc)


def _log_failed_write(future: Future[None]) -> None:
    """A write of the backend's vectors failed on the writer thread: the backend still holds
    them, and a later call asks it again; nobody waits for this write to raise to."""
    exc = None if future.cancelled() else future.exception()
    if exc is not None:
        logger.warning("could not store the backend's vectors here: %s", exc)


def _degraded(message: str) -> None:
    """Say that the cache could not do its part of a call that still succeeds."""
    logger.warning(message)
    warn(message)
