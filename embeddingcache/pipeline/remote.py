"""The backend tier: what the team backend already holds is asked for before anything is
computed here, kept here as it comes, and what this machine computed is offered back
(``push``). A backend that holds another version of the model than this machine's files is
not used; one that names the version nobody here knows sets the call's version."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from .._util import deferred_warnings
from ..engines import Engine
from ..errors import ProviderError
from ..models import ModelSpec
from .call import Resolution, Target
from .chain import Chain
from .counters import Counters
from .policy import degraded
from .versioning import Versions
from .writer import Writer

__all__ = ["BackendTier"]

logger = logging.getLogger("embeddingcache")


class BackendTier:
    """The team backend as a tier of the read-through loop (thread-safe)."""

    def __init__(
        self,
        chain: Chain,
        versions: Versions,
        writer: Writer,
        counters: Counters,
        dimension_of: Callable[[ModelSpec, str], int],
    ) -> None:
        self.chain = chain
        self.versions = versions
        self.writer = writer
        self.counters = counters
        self.dimension_of = dimension_of  # the dimension a shard holds, 0 when unknown
        self._lock = threading.Lock()
        self._refused: set[tuple[str, str]] = set()  # backend versions warned about

    def lookup(
        self, state: Resolution, positions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The backend's stored vectors of the distinct texts at ``positions`` and which it
        had; ``None`` when it could not answer, answered vectors of another dimension than
        this cache holds, or holds another version than the call looked up (then the call
        has switched to that version's shard, and looks up again)."""
        remote = self.chain.backend()
        if remote is None:
            return None
        call = state.call
        spec = call.spec
        try:
            vectors, had = remote.lookup(spec, call.normalized_at(positions), prompt=call.prompt)
        except ProviderError as exc:
            # A wrong or missing token is a mistake to point out; an absent backend is not.
            refused = exc.status in (401, 403)
            logger.log(logging.WARNING if refused else logging.DEBUG, "backend lookup: %s", exc)
            return None
        theirs = remote.version(spec)
        target = state.target
        if theirs is not None and theirs != target.version:
            if target.pinned:
                self._refuse_version(remote.url, spec, theirs, target.version)
                return None
            state.switch(Target(self.versions.shard_of(spec, theirs), theirs, target.pinned))
            if state.target.shard != target.shard:
                return None  # the caller looks up again, in that version's shard
        known = self.dimension_of(spec, state.target.shard)
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

    def keep(
        self, state: Resolution, positions: np.ndarray, vectors: np.ndarray, had: np.ndarray
    ) -> None:
        """Hand the backend's vectors of the distinct texts at ``positions`` (its answer's
        rows where ``had``) to the writer thread to store here, without waiting: the backend
        keeps them meanwhile, so a write that has not landed (or failed) costs a later call
        one more lookup there, never a vector. Storing them on the call's path took about 0.5 s
        of a 0.75 s call of 20,000 remote hits (issue 18).

        `Pipeline.close` waits for the write; a failure is logged, never raised into a later
        call. What the caller got is the backend's vector: if this cache stored another one
        for a text meanwhile (computed here, in the moment between its lookup and this
        write), the stored one is kept and served by later hits here, as insert-or-ignore
        keeps any stored vector; the two are the same model's, differing in the last bits at
        most."""
        if state.damaged:
            replace = state.damaged.intersection(state.call.distinct_keys(positions))
            if replace:
                degraded(
                    f"{len(replace)} stored vector(s) of model {state.call.spec.name!r} had "
                    "the wrong length; replacing them with the backend's"
                )
        # The shard as it is now: the version the backend's vectors are of.
        self.writer.submit_unawaited(self._store, state, state.target, positions, vectors, had)

    def _store(
        self,
        state: Resolution,
        target: Target,
        positions: np.ndarray,
        vectors: np.ndarray,
        had: np.ndarray,
    ) -> None:
        rows = state.rows(positions, vectors if had.all() else vectors[had], target=target)
        # The caller is gone: what `store_rows` would warn of, it has logged (a degraded
        # write) or the caller's thread announced (replacing damaged rows).
        with deferred_warnings():
            self.writer.store_rows(rows, announce=False)

    def push(
        self, state: Resolution, target: Target, positions: np.ndarray, vectors: np.ndarray
    ) -> None:
        """Offer vectors computed here, of ``target``'s version, to the backend (when one is
        configured)."""
        remote = self.chain.backend()
        if remote is None:
            return
        call = state.call
        texts = call.normalized_at(positions)
        try:
            accepted = remote.push(
                call.spec, texts, vectors, prompt=call.prompt, version=target.version
            )
        except ProviderError as exc:
            # Pushing is a courtesy to the team; the caller already has its vectors.
            logger.warning("could not push %d vector(s) to the backend: %s", len(texts), exc)
            return
        self.counters.add(pushed=accepted)

    def check_version(self, state: Resolution, remote: Engine) -> None:
        """After the backend computed: its vectors are of the call's version, or are refused
        (`ProviderError`: the next engine of the chain is asked)."""
        spec = state.call.spec
        theirs = remote.version(spec)
        target = state.target
        if theirs is None or theirs == target.version:
            return
        if target.version is None and not target.pinned:
            # The first version this call learns of.
            state.switch(Target(self.versions.shard_of(spec, theirs), theirs, target.pinned))
            return
        raise ProviderError(
            f"the backend computes model {spec.name!r} at version {theirs}, and this "
            f"call needs version {target.version}"
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
