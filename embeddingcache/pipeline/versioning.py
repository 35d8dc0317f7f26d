"""Which version of a model answers a call, and so which shard: the version as this
machine's engine knows it (its weights, or its answers to a probe), else as the backend
says it (`embeddingcache.versions` holds the names and the probe itself)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from ..engines import EmbedOptions, Engine
from ..errors import InvalidInputError, ProviderError
from ..keys import keys_of
from ..models import ModelSpec, resolve_model
from ..storage import Store
from ..versions import (
    PROBE,
    PROBE_TOLERANCE,
    model_of,
    probe_distance,
    probe_version,
    versioned_name,
)
from .call import Target
from .chain import Chain

__all__ = ["PROBE_EVERY_S", "PROBE_RETRY_S", "PROBE_TIMEOUT_S", "Versions"]

logger = logging.getLogger("embeddingcache")

# How often a long-running process asks a model known by its answers (an API's) the probe again.
PROBE_EVERY_S = 3600.0
# How long the read path leaves a model alone after its probe failed (see Versions.probed).
PROBE_RETRY_S = 60.0
# How long the read path waits for a probe's answer: a hit is served meanwhile from the shard
# the model's recorded version names, so an API that hangs costs a hit this much, once.
PROBE_TIMEOUT_S = 2.0


class Versions:
    """Model versions and the shards they map to, for one store (thread-safe)."""

    def __init__(self, storage: Store, chain: Chain) -> None:
        self.storage = storage
        self.chain = chain
        self._lock = threading.Lock()
        self._probes: dict[str, tuple[str, float]] = {}  # model -> (version, when probed)
        self._unprobed: dict[str, float] = {}  # model -> when a probe last failed
        self._probing: dict[str, threading.Lock] = {}

    def target(self, spec: ModelSpec, *, fresh: bool) -> Target:
        """The shard of the model's current version, that version, and whether this
        machine's engine vouched for it (else it is the one the backend said last)."""
        version, pinned = self.version(spec, fresh=fresh)
        return Target(self.shard_of(spec, version), version, pinned)

    def version(self, spec: ModelSpec, *, fresh: bool) -> tuple[str | None, bool]:
        """The model's version and whether this machine's engine vouched for it (else it is
        the one the backend said last, or ``None``)."""
        engine = self.chain.local(spec)
        if engine is not None and engine.versioned_by == "weights":
            version = engine.version(spec, fresh=fresh)
            if version is not None:
                return version, True
        elif engine is not None and engine.versioned_by == "probe":
            version = self.probed(spec, engine, fresh=fresh)
            if version is not None:
                return version, True
        remote = self.chain.backend()
        return (remote.version(spec) if remote is not None else None), False

    def probed(self, spec: ModelSpec, engine: Engine, *, fresh: bool) -> str | None:
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
        for shard in [spec.name, *versions]:
            info = self.storage.info(shard)
            if info is None or info.revision is None:
                continue
            found = self.storage.lookup(shard, keys)
            if len(found.positions) == len(keys) and (
                probe_distance(found.vectors, answers) <= PROBE_TOLERANCE
            ):
                return info.revision
        version = probe_version(answers)
        shard = self.shard_of(spec, version)
        if self.storage.info(shard) is None or shard == spec.name:
            self.storage.put(shard, keys, list(PROBE), answers, revision=version)
        return version

    def shard_of(self, spec: ModelSpec, version: str | None) -> str:
        """The shard of ``version`` of the model.

        A model's first version keeps its own shard (``spec.name``), recorded there the first
        time it is known (a shard of an earlier embeddingcache has none: it takes the one
        found now); every other version has a shard of its own (`versions.versioned_name`),
        so that a model fine-tuned in place, a Hub id at a new commit or a model replaced
        behind a backend never gets the vectors of another, and going back to earlier
        weights finds theirs again.
        """
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

    def stale(self) -> list[str]:
        """The shards of model versions whose weights no longer exist where the model is
        loaded from (a folder holds only its latest weights; a Hub commit's snapshot was
        removed from the Hugging Face cache). Versions known by their answers are never
        stale: there is no telling (`Engine.holds`)."""
        stale = []
        for summary in self.storage.summaries():
            if summary.model is None or summary.revision is None:
                continue
            spec = resolve_model(model_of(summary.model))
            try:
                engine = self.chain.engine(spec)
            except InvalidInputError:
                continue
            if engine.holds(spec, summary.revision) is False:
                stale.append(summary.model)
        return stale
