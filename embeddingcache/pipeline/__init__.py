"""The read-through pipeline: one call's path from texts to stored vectors.

validate (the caller) -> normalize (the caller) -> `Pipeline.prepare`: embedded strings,
keys, duplicates -> `Pipeline.resolve`: look up, ask the backend, compute, store, count, as
`Slice` objects -> `Pipeline.vectors`: assembled in input order. `Pipeline.store` adds
vectors computed elsewhere (a push to the server, an import) under the same rules.

Each job has a module of its own; `Pipeline` wires them and walks a call through them:

- `call`: one call's data (`Call`, `Target`, `Resolution`, `Slice`);
- `versioning`: which version of a model answers, and its shard;
- `chain`: the providers and their engines (the only place that knows them by name);
- `remote`: the backend tier (lookups, keeping what it had, pushes);
- `compute`: computing in steps and slices, stored as they come;
- `claims`: one computation per text across every process sharing the store;
- `writer`: the writer thread, and the one rule for storing rows;
- `policy`: when a call degrades without its storage, and ``max_size``;
- `counters`: what the calls did.

Every caller of the pipeline goes through `Pipeline`'s public calls: `EmbeddingCache`'s
methods, the server's ``/embed`` and ``/push``, and `embeddingcache.transfer`'s import
(`store_new`). The contract of a `Slice` (docs/architecture.md) is what the callers may rely
on: hits come first, then what the backend had (handed to the writer thread to store here,
not awaited: the backend still holds them), then computed slices, each stored before it is
yielded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..engines import EmbedOptions, Engine, EngineSettings
from ..errors import DimensionMismatchError, StorageError
from ..models import ModelSpec
from ..storage import Lookup, Store
from ..storage.evict import PruneReport
from .call import Call, Resolution, Slice, Target, dedupe
from .chain import CHAINS, Chain
from .claims import Claims, lease_from_env
from .compute import STEP_BATCHES, STORE_EVERY, Compute, StoreEvery, tapered
from .counters import Counters
from .policy import StoragePolicy, degraded
from .remote import BackendTier
from .versioning import Versions
from .writer import Writer, store_new

if TYPE_CHECKING:
    from ..engines.backend import BackendEngine

__all__ = [
    "CHAINS",
    "STEP_BATCHES",
    "STORE_EVERY",
    "Answer",
    "Call",
    "Pipeline",
    "Slice",
    "StoreEvery",
    "Target",
    "dedupe",
    "store_new",
    "tapered",
]

logger = logging.getLogger("embeddingcache")


class Answer(NamedTuple):
    """A call's vectors in input order; which of them the store held (``None``: all of
    them); the model version they are of; and which of them another call computed while this
    one waited for them (``None``: none)."""

    vectors: np.ndarray
    hits: np.ndarray | None
    version: str | None
    waited: np.ndarray | None = None


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
        self.settings = settings
        self.chain = Chain(settings, chain)
        self.policy = StoragePolicy(store, max_size=max_size)
        self.counters = Counters(store)
        self.versions = Versions(store, self.chain)
        self.writer = Writer(store, self.policy, self.counters)
        self.remote = BackendTier(
            self.chain, self.versions, self.writer, self.counters, self.known_dimension
        )
        self.claims = Claims(store, lease_s=lease_from_env())
        self.computing = Compute(
            store,
            self.chain,
            self.writer,
            self.remote,
            self.counters,
            self.claims,
            self.policy,
            push=push,
            store_every=store_every,
        )

    @property
    def store_every(self) -> StoreEvery:
        """How often a call stores what it computed (`StoreEvery`); settable."""
        return self.computing.store_every

    @store_every.setter
    def store_every(self, every: StoreEvery) -> None:
        self.computing.store_every = every

    # -- the calls ------------------------------------------------------------------------

    def prepare(self, spec: ModelSpec, normalized: list[str], prompt: str) -> Call:
        """Key and dedupe normalized texts for ``spec`` with ``prompt`` in front, for the
        shard of the model's current version (checked at most once a second: see
        `shard_for`)."""
        return Call(spec, normalized, prompt, self._target(spec, fresh=False))

    def resolve(
        self,
        call: Call,
        *,
        compute: bool = True,
        options: EmbedOptions | None = None,
    ) -> Iterator[Slice]:
        """The call's vectors as slices: the stored ones, then the backend's (lookup only,
        stored here by the writer thread, not awaited: see `BackendTier.keep`), then, when
        ``compute``, computed ones, each slice stored before it is yielded. Without
        ``compute``, what nobody had is in no slice.

        Raises:
            TextTooLongError: a text is too long for the model (``index`` in the call).
            AllProvidersFailedError: vectors were missing and nobody could compute them.
            StorageError: see `EmbeddingCache.get_embeddings`.
        """
        return self._resolve(self._resolution(call, options), compute=compute)

    def vectors(
        self,
        call: Call,
        *,
        compute: bool = True,
        options: EmbedOptions | None = None,
        progress: Callable[[Slice], None] | None = None,
    ) -> Answer:
        """The call's vectors in input order, which of them the store held, and their
        version (`Answer`). Without ``compute``, the rows of vectors nobody had are zeros.
        ``progress`` is called with each slice as it comes (a progress bar's).
        Raises what `resolve` raises."""
        if progress is None and len(call.firsts) == 1:
            # One text (a query a service embeds per request): from memory when it is there.
            target = call.target
            found = self.storage.recall(target.shard, call.keys[0])
            if found is not None:
                self.counters.lookup(target.shard, 1, 0, found.tokens)
                self.policy.worked = True
                vectors = found.vectors if call.inverse is None else found.vectors[call.inverse]
                return Answer(vectors, None, target.version)
        state = self._resolution(call, options)
        slices = self._resolve(state, compute=compute)
        if progress is not None:
            slices = _reported(slices, progress)
        vectors, hits, waited = self._assembled(state, slices)
        return Answer(vectors, hits, state.target.version, waited)

    def absent(self, call: Call) -> list[int]:
        """The positions of the call's distinct texts whose shard holds no vector for them:
        what a `resolve` would fetch or compute. Reads keys only, no vector."""
        distinct = call.distinct_keys()
        held = self.storage.held(call.target.shard, distinct)
        return [u for u, key in enumerate(distinct) if key not in held]

    def store(self, spec: ModelSpec, embedded: Sequence[str], vectors: np.ndarray) -> int:
        """Store vectors computed elsewhere for embedded strings not stored yet (see
        `store_new`); the number stored. Keeps the cache within ``max_size`` afterwards."""
        added = store_new(self.storage, self.shard_for(spec, fresh=True), embedded, vectors)
        self.policy.worked = True
        self.policy.keep_within()
        return added

    # -- the loop -------------------------------------------------------------------------

    def _resolve(self, state: Resolution, *, compute: bool) -> Iterator[Slice]:
        call = state.call
        distinct = call.distinct_keys()
        looked_up = time.time()  # claims let go after it may hold texts stored since
        found = self._lookup(state, distinct)
        n = len(distinct)
        if n and len(found.positions) == n:  # every text stored: the hit path, nothing more
            self.counters.lookup(state.target.shard, n, 0, found.tokens)
            self.policy.worked = True
            yield Slice(found.positions, found.vectors, "hit")
            return
        remote = self.settings.remote_url is not None
        if len(found.positions) < n and (compute or remote):
            # Before anything is fetched or computed, the model's version as its files say now.
            now = self._target(call.spec, fresh=True)
            if now.pinned and now.version != state.target.version:
                state.switch(now)
                found = self._lookup(state, distinct)
        held = np.zeros(n, dtype=bool)
        held[found.positions] = True
        missing = np.flatnonzero(~held)
        state.found_damaged([distinct[u] for u in found.damaged])

        answer = None
        if len(missing) and remote:
            shard = state.target.shard
            answer = self.remote.lookup(state, missing)
            if state.target.shard != shard:
                # The backend holds another version than the one this call looked up, and
                # this machine cannot tell which is current: the backend's is; start again.
                yield from self._resolve(state, compute=compute)
                return
        hits = len(found.positions)
        self.counters.lookup(state.target.shard, hits, n - hits, found.tokens)
        if hits:
            self.policy.worked = True
            yield Slice(found.positions, found.vectors, "hit")
        if hits == n:
            return
        if answer is not None:
            vectors, had = answer
            if had.any():
                positions = missing[had]
                self.remote.keep(state, positions, vectors, had)
                self.counters.add(remote_hits=len(positions))
                # The backend's vectors as it holds them: the team's stored ones, which every
                # client of the backend gets (see `BackendTier.keep`). A copy: the writer
                # stores ``vectors`` while the caller may change the slice's in place.
                yield Slice(positions, vectors[had], "remote")
                missing = missing[~had]
        if len(missing) and compute:
            yield from self.computing.computed(state, missing, looked_up)

    def _resolution(self, call: Call, options: EmbedOptions | None) -> Resolution:
        """A call's own state, with the cache's engine options unless it has its own."""
        return Resolution(call, options or EmbedOptions(batch_size=self.settings.batch_size))

    def _target(self, spec: ModelSpec, *, fresh: bool) -> Target:
        """`Versions.target`; when the store cannot be read to map the version to its shard
        and the policy lets the call go on (a process that opens a cache on a full disk
        cannot even read it: SQLite's ``-shm`` file cannot grow), the model's own shard at
        the version its engine says. The lookup that follows meets the same fault and warns;
        a write that lands after all is checked against the version the shard records."""
        try:
            return self.versions.target(spec, fresh=fresh)
        except StorageError as exc:
            if not self.policy.degrades(exc):
                raise
            logger.warning("cannot read the version of %r in the cache (%s)", spec.name, exc)
        try:
            version, pinned = self.versions.version(spec, fresh=fresh)
        except StorageError:  # a version known by its answers, matched against the store
            version, pinned = None, False
        return Target(spec.name, version, pinned)

    def _lookup(self, state: Resolution, distinct: list[bytes]) -> Lookup:
        target = state.target
        try:
            return self.storage.lookup(target.shard, distinct)
        except StorageError as exc:
            if not self.policy.degrades(exc):
                raise
            # The storage that worked cannot be read now (a database gone, a file system
            # remounted): the caller still gets its vectors, computed; the next call tries again.
            degraded(f"cannot read the cache ({exc}); computing the texts instead")
        try:
            dimension = self.known_dimension(state.call.spec, target.shard)
        except StorageError:  # the shard's model row is unreadable too
            dimension = self.chain.dimension_said(state.call.spec) or state.call.spec.dimension or 0
        return Lookup.empty(dimension)

    def _assembled(
        self, state: Resolution, slices: Iterator[Slice]
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The slices' vectors in input order, which the store held (``None``: all), and
        which were waited for (``None``: none)."""
        call = state.call
        first = next(slices, None)
        n = len(call.firsts)
        if first is not None and first.source == "hit" and len(first.positions) == n:
            # All stored: the lookup's rows are already in key order (the hot path).
            if call.inverse is None:
                return first.vectors, None, None
            return first.vectors[call.inverse], None, None
        parts = [first, *slices] if first is not None else []
        only = parts[0] if len(parts) == 1 else None
        if only is not None and only.source == "remote" and len(only.positions) == n:
            # Every text from the backend: its positions ascend (those the lookup missed),
            # so its rows (a copy of the answer's) are in key order already, as a lookup's.
            hit = np.zeros(n, dtype=bool)
            if call.inverse is None:
                return only.vectors, hit, None
            return only.vectors[call.inverse], hit[call.inverse], None
        dimensions = {s.vectors.shape[1] for s in parts}
        if len(dimensions) > 1:
            raise DimensionMismatchError(
                f"model {call.spec.name!r} gave vectors of {sorted(dimensions)} dimensions"
            )
        shard = state.target.shard
        dimension = dimensions.pop() if dimensions else self.known_dimension(call.spec, shard)
        filled = sum(len(s.positions) for s in parts)
        # Every row is filled below unless something stayed missing (lookup only).
        unique = (np.zeros if filled < n else np.empty)((n, dimension), dtype=np.float32)
        hit = np.zeros(n, dtype=bool)
        waited: np.ndarray | None = None
        for part in parts:
            unique[part.positions] = part.vectors
            if part.source == "hit":
                hit[part.positions] = True
            elif part.source == "waited":
                if waited is None:
                    waited = np.zeros(n, dtype=bool)
                waited[part.positions] = True
        if call.inverse is None:
            return unique, hit, waited
        inverse = call.inverse
        return unique[inverse], hit[inverse], None if waited is None else waited[inverse]

    # -- versions -------------------------------------------------------------------------

    def version(self, spec: ModelSpec, *, fresh: bool = False) -> str | None:
        """The model's current version here (see `shard_for`), ``None`` when unknown."""
        return self.versions.version(spec, fresh=fresh)[0]

    def shard_for(self, spec: ModelSpec, *, fresh: bool = False) -> str:
        """The shard of the model's current version (`Versions.shard_of`)."""
        return self.versions.target(spec, fresh=fresh).shard

    def stale_versions(self) -> list[str]:
        """The shards of model versions whose weights no longer exist (`Versions.stale`)."""
        return self.versions.stale()

    # -- engines and dimensions -----------------------------------------------------------

    def engine(self, spec: ModelSpec) -> Engine:
        """The engine of this machine that computes ``spec``'s vectors (`Chain.engine`)."""
        return self.chain.engine(spec)

    def loaded_engines(self) -> dict[str, Engine]:
        """The engines created so far, by kind (the backend's apart)."""
        return self.chain.loaded()

    def backend(self) -> BackendEngine | None:
        """The team backend, when one is configured (httpx is imported on first use)."""
        return self.chain.backend()

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
        self.chain.learned_dimension(spec, loaded)
        return loaded

    def known_dimension(self, spec: ModelSpec, shard: str | None = None) -> int:
        """The model's dimension as known without loading it (from ``shard``, by default
        its current version's); 0 when unknown."""
        info = self.storage.info(shard if shard is not None else self.shard_for(spec))
        if info is not None:
            return info.dimension
        return self.chain.dimension_said(spec) or spec.dimension or 0

    # -- storage, counts, lifecycle -------------------------------------------------------

    def degrades(self, exc: StorageError) -> bool:
        """Whether a call goes on without its storage after ``exc`` (`StoragePolicy`)."""
        return self.policy.degrades(exc)

    def prune(self, **options: object) -> PruneReport:
        """`embeddingcache.storage.evict.prune` of this store, one prune at a time."""
        return self.policy.prune(**options)

    def keep_within(self) -> None:
        """With ``max_size``, prune once the stored data outgrows it (`StoragePolicy`)."""
        self.policy.keep_within()

    @property
    def stats(self) -> dict[str, int]:
        return self.counters.stats

    @property
    def token_stats(self) -> dict[str, dict[str, int]]:
        """Per model, in this process: the tokens its computed vectors cost (``computed``)
        and the recorded tokens of its hits (``saved``); models with neither are left out."""
        return self.counters.token_stats

    def close(self) -> None:
        """Store what was handed over, then close the engines and the backend client (not
        the store)."""
        self.writer.close()
        self.claims.close()
        self.chain.close()


def _reported(slices: Iterator[Slice], progress: Callable[[Slice], None]) -> Iterator[Slice]:
    for part in slices:
        progress(part)
        yield part
