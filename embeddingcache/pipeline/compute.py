"""Computing a call's missing texts, once across every process that shares the store: the
texts are claimed first (`embeddingcache.pipeline.claims`), those another call holds are
waited for and read; the rest are computed in steps sized by the chain's first engine,
walked down the chain when an engine fails, cut into slices that the writer stores while
the next computes (`STORE_EVERY`), so that a call interrupted half way keeps every stored
slice."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from .._util import Deferred, deferred_warnings, warn
from ..batching import plan, plan_count, token_bound
from ..engines import Engine
from ..errors import ProviderError, StorageError, TextTooLongError
from ..storage import Store
from ..storage.store import ReadOnlyStorageError
from ..tokens import costs
from .call import Resolution, Slice, Target
from .chain import Chain
from .claims import WAIT_FIRST_S, WAIT_MOST_S, Claims
from .counters import Counters
from .policy import StoragePolicy
from .remote import BackendTier
from .writer import Writer

__all__ = ["STEP_BATCHES", "STORE_EVERY", "Compute", "StoreEvery", "tapered"]

logger = logging.getLogger("embeddingcache")


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

# A step's result: the positions it computed, their vectors, and the engine that did.
Step = tuple[np.ndarray, np.ndarray, Engine]
Writing = tuple[Future[tuple[np.ndarray, Deferred]], np.ndarray]


class Compute:
    """Computes, stores and yields a call's missing texts (thread-safe)."""

    def __init__(
        self,
        storage: Store,
        chain: Chain,
        writer: Writer,
        remote: BackendTier,
        counters: Counters,
        claims: Claims,
        policy: StoragePolicy,
        *,
        push: bool = False,
        store_every: StoreEvery = STORE_EVERY,
    ) -> None:
        self.storage = storage
        self.chain = chain
        self.writer = writer
        self.remote = remote
        self.counters = counters
        self.claims = claims
        self.policy = policy
        self.push = push
        self.store_every = store_every

    def computed(self, state: Resolution, missing: np.ndarray, since: float) -> Iterator[Slice]:
        """The vectors of the distinct texts at ``missing``, computed once across every call
        that shares the store: the texts no other call holds are claimed and computed here;
        those another holds are waited for, then read ("waited"); those whose holder let go
        without storing them, or died, are claimed again. A store that takes no claims
        (read-only) computes them all, as does one that cannot be written now (degraded).
        ``since`` is when the call looked them up (``time.time()``)."""
        shard = state.target.shard
        try:
            claim = self.claims.claim(shard, state.call.distinct_keys(missing), since=since)
        except StorageError as exc:
            if not isinstance(exc, ReadOnlyStorageError):
                if not self.policy.degrades(exc):
                    raise
                # Logged, not warned: the write that follows meets the same fault and
                # warns the caller once (docs/reliability.md, promise 4).
                logger.warning("cannot claim the texts to compute (%s); computing them all", exc)
            yield from self._slices(state, missing)
            return
        try:
            mine = missing[claim.won]
            if claim.recheck.any():  # a claim that ended lately held these: stored since?
                found, mine = self._stored_meanwhile(state, mine, claim.recheck[claim.won])
                if found is not None:
                    yield found
            if len(mine):
                yield from self._slices(state, mine)
        finally:
            self.claims.release(shard, claim)
        if not claim.won.all():
            yield from self._waited(state, missing[~claim.won])

    def _stored_meanwhile(
        self, state: Resolution, positions: np.ndarray, ask: np.ndarray
    ) -> tuple[Slice | None, np.ndarray]:
        """The vectors of ``positions[ask]`` stored since this call's lookup (by another
        call, as a "waited" slice), and the positions still to compute."""
        asked = positions[ask]
        try:
            found = self.storage.lookup(state.target.shard, state.call.distinct_keys(asked))
        except StorageError:
            return None, positions  # the compute that follows meets the storage's state
        if not len(found.positions):
            return None, positions
        self.counters.add(waited=len(found.positions))
        keep = ~np.isin(positions, asked[found.positions])
        return Slice(asked[found.positions], found.vectors, "waited"), positions[keep]

    def _waited(self, state: Resolution, positions: np.ndarray) -> Iterator[Slice]:
        """The texts at ``positions``, which other calls hold. Their claims are watched (one
        small read of the claim table, with a backoff from `WAIT_FIRST_S` to `WAIT_MOST_S`,
        woken early when this process stores a slice); once a claim lets texts go, they are
        read, and those it let go unstored (a failed call, a dead process) are claimed and
        computed here."""
        shard = state.target.shard
        pause = WAIT_FIRST_S
        while len(positions):
            try:
                held = self.claims.held(shard, state.call.distinct_keys(positions))
            except StorageError as exc:
                logger.warning("cannot read the claims (%s): computing what was waited for", exc)
                held = np.zeros(len(positions), dtype=bool)
            if held.all():
                self.claims.wait_stored(pause)
                pause = min(pause * 1.5, WAIT_MOST_S)
                continue
            let_go = positions[~held]
            since = time.time()
            found, unstored = self._stored_meanwhile(state, let_go, np.ones(len(let_go), bool))
            if found is not None:
                yield found
            if len(unstored):
                yield from self.computed(state, unstored, since)
            positions, pause = positions[held], WAIT_FIRST_S

    def _slices(self, state: Resolution, missing: np.ndarray) -> Iterator[Slice]:
        """Compute the distinct texts at ``missing`` in steps, cut into slices by
        `store_every`; each slice is stored by the writer thread while the next one computes,
        and yielded once stored. However the loop ends (an exception from the model, a
        ``KeyboardInterrupt``, the caller closing the generator), what was computed is
        stored before the exception goes on."""
        every = self.store_every
        steps, in_flight, each_from = self._steps(state, missing)
        # Slices handed to the writer, oldest first: one is yielded once the next is
        # computed, so the write of one overlaps the computing of the next.
        writing: list[Writing] = []
        parts: list[tuple[np.ndarray, np.ndarray]] = []  # computed, not handed over yet
        held, started = 0, time.monotonic()
        engine: Engine | None = None
        computed = self._computed_steps(
            state,
            steps,
            in_flight,
            lambda p, v, e: _wait_quietly(self._hand_over(state, [(p, v)], e)[0]),
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
                writing.append(self._hand_over(state, parts, engine))
                parts, held, started = [], 0, time.monotonic()
                while len(writing) > 1:
                    yield _stored(writing.pop(0))
            if parts and engine is not None:
                writing.append(self._hand_over(state, parts, engine))
                parts = []
            while writing:
                yield _stored(writing.pop(0))
        except BaseException:
            # Keep what was computed: store it before the error reaches the caller. A
            # failure to store it is logged; the caller sees the error that stopped the call.
            computed.close()  # the requests still in flight are stored as they end
            if parts and engine is not None:
                writing.append(self._hand_over(state, parts, engine))
            for future, _ in writing:
                _wait_quietly(future)
            raise

    def _steps(self, state: Resolution, missing: np.ndarray) -> tuple[list[np.ndarray], int, int]:
        """The positions of each engine call, how many may run at once, and from which call
        on each call's vectors are stored as they come: as the first engine of the chain can
        take them (its `Limits`). A model on this machine takes `STEP_BATCHES` batches per
        call, one call at a time, stored by `store_every`, and a call of more than a slice
        ends in calls of half the size each (`tapered`), each stored as it comes: what is
        left to store once the model is done is one batch, not a slice. An engine that
        bounds a batch by tokens (an API's, billed per token) takes one request's worth per
        call, ``in_flight`` at a time, so that requests run together, and each answer is
        stored as it comes: an interrupted (even killed) run keeps every vector it paid for.
        The first engine sees every text first (`Engine.check_inputs`), before anything is
        sent."""
        call, options, every = state.call, state.options, self.store_every
        first = self.chain.lead(call.spec)
        texts = call.embedded_at(missing)
        limits = None
        if first is not None:
            name, lead = first
            limits = lead.limits
            try:
                lead.check_inputs(call.spec, texts, truncate=options.truncate)
            except TextTooLongError as exc:
                raise exc.at(call.firsts[missing[exc.index]]) from None
            except ProviderError as exc:  # it cannot compute these: the next engine may
                logger.debug("engine %s cannot take these texts: %s", name, exc)
                state.fail(name, exc)
        if limits is None or (limits.token_budget is None and limits.in_flight <= 1):
            step = max(1, min(every.vectors, options.batch_size * STEP_BATCHES))
            counted = list(plan_count(len(missing), most=step))
            each_from = len(counted) - 1  # the last call's vectors need no waiting for more
            if len(missing) > every.vectors:
                counted[-1:] = tapered(*counted[-1], batch=options.batch_size)
            return [missing[a:b] for a, b in counted], 1, each_from
        ranges = plan(
            map(token_bound, texts),
            most=min(limits.batch_inputs, every.vectors),
            budget=limits.token_budget,
        )
        return [missing[a:b] for a, b in ranges], max(1, limits.in_flight), 0

    def _computed_steps(
        self,
        state: Resolution,
        steps: list[np.ndarray],
        in_flight: int,
        rescue: Callable[[np.ndarray, np.ndarray, Engine], None],
    ) -> Generator[Step, None, None]:
        """``(positions, vectors, engine)`` of each step, computed ``in_flight`` at a time, in
        the order they finish. When one fails (or this thread is interrupted while it
        waits), no other step is started, the steps already running are awaited and yielded
        (their vectors are paid for), and then the error goes on. When the caller stops
        taking them (its own error, an interrupt while it stores), the steps still running
        are awaited and handed to ``rescue``, which stores them."""
        if in_flight <= 1 or len(steps) <= 1:
            for positions in steps:
                vectors, engine = self._compute(state, positions)
                yield positions, vectors, engine
            return
        pool = ThreadPoolExecutor(in_flight, thread_name_prefix="embeddingcache-compute")
        running: dict[Future[tuple[np.ndarray, Engine]], np.ndarray] = {}
        queue = iter(steps)
        error: BaseException | None = None
        try:
            for positions in itertools.islice(queue, in_flight):
                running[pool.submit(self._compute, state, positions)] = positions
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
                            running[pool.submit(self._compute, state, following)] = following
                    yield positions, vectors, engine
            if error is not None:
                raise error
        finally:
            _rescue(running, rescue)
            pool.shutdown(wait=False, cancel_futures=True)

    def _compute(self, state: Resolution, positions: np.ndarray) -> tuple[np.ndarray, Engine]:
        """Vectors of the distinct texts at ``positions`` from the first engine of the chain
        that computes them; an engine that failed earlier in the call is not asked again."""
        call = state.call
        spec = call.spec
        origins = [call.firsts[u] for u in positions]
        texts = [call.normalized[i] for i in origins]
        tried: list[str] = []
        for name, engine in self.chain.links(spec):
            if engine is None:
                tried.append(f"{name} (not configured)")
                continue
            if state.has_failed(name):
                continue
            try:
                vectors = engine.embed(spec, texts, prompt=call.prompt, options=state.options)
                if engine.versioned_by == "backend":
                    self.remote.check_version(state, engine)
            except TextTooLongError as exc:
                raise exc.at(origins[exc.index]) from None
            except ProviderError as exc:
                logger.debug("engine %s failed: %s", name, exc)
                state.fail(name, exc)
                continue
            if engine.answers_lookups:  # the backend computed them, for this call
                self.counters.add(remote_computed=len(texts))
            else:
                self.counters.add(computed=len(texts))
            return vectors, engine
        raise self.chain.all_failed(spec, tried, state.failed)

    def _hand_over(
        self, state: Resolution, parts: list[tuple[np.ndarray, np.ndarray]], engine: Engine
    ) -> Writing:
        """Give the writer thread a slice of computed parts to store (and push)."""
        positions = np.concatenate([p for p, _ in parts])
        vectors = parts[0][1] if len(parts) == 1 else np.concatenate([v for _, v in parts])
        # The shard as it is now: the version these vectors were computed at.
        future = self.writer.submit(
            self._store_slice, state, state.target, positions, vectors, engine
        )
        return future, positions

    def _store_slice(
        self,
        state: Resolution,
        target: Target,
        positions: np.ndarray,
        vectors: np.ndarray,
        engine: Engine,
    ) -> tuple[np.ndarray, Deferred]:
        call = state.call
        with deferred_warnings() as found:  # the caller's thread issues them
            # Counted here, on the writer thread, so that tokenizing overlaps the computing
            # of the next slice; by the engine that computed the slice (see tokens.costs).
            cost = costs(engine, call.spec, call.embedded_at(positions))
            rows = state.rows(positions, vectors, cost, target=target)
            stored = self.writer.store_rows(rows)
            self.claims.notify_stored()
            if cost[0] is not None:
                self.counters.computed_tokens(call.spec.name, sum(cost[0]))
            if self.push and not engine.answers_lookups:  # what the backend computed, it has
                self.remote.push(state, target, positions, stored)
        return stored, found


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


def _stored(writing: Writing) -> Slice:
    """A slice handed to the writer, once stored: its warnings issued on this thread."""
    future, positions = writing
    stored, found = future.result()
    for message, category in found:
        warn(message, category)
    return Slice(positions, stored, "computed")


def _wait_quietly(future: Future[tuple[np.ndarray, Deferred]]) -> None:
    """Wait for a slice's write while another error is on its way to the caller."""
    try:
        _stored((future, np.empty(0, dtype=np.intp)))
    except BaseException as exc:  # the other error is the one the caller must see
        logger.warning("could not store a computed slice: %s", exc)


def _rescue(
    running: dict[Future[tuple[np.ndarray, Engine]], np.ndarray],
    rescue: Callable[[np.ndarray, np.ndarray, Engine], None],
) -> None:
    """Hand the steps still in flight, once done, to ``rescue`` (they are paid for)."""
    if running:
        logger.info("storing the %d answer(s) still in flight", len(running))
    for future, positions in running.items():
        try:
            vectors, engine = future.result()
        except BaseException:  # its error is not the one the caller must see
            continue
        rescue(positions, vectors, engine)
