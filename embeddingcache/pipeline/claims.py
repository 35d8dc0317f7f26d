"""One computation per text across every process that shares a store: a call claims the
texts it is about to compute, in the store (`embeddingcache.storage.claims`); a text that
another call holds is waited for and then read. A claim is a lease, renewed by one thread
per cache while its holders work, so that a process that dies delays the others by one lease
at most (`CLAIM_LEASE_S`).

Waiting never spins on the database: it reads the claim table (a few rows) with a backoff
from `WAIT_FIRST_S` to `WAIT_MOST_S`, woken at once when a call of this process stores a
slice, and looks the texts up once their claim lets them go.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from .._util import positive_env
from ..errors import StorageError
from ..storage import Store
from ..storage.claims import Claim, ClaimTable

__all__ = ["CLAIM_LEASE_S", "ENV_CLAIM_LEASE", "WAIT_FIRST_S", "WAIT_MOST_S", "Claims"]

logger = logging.getLogger("embeddingcache")

# How long a claim holds without being renewed: what a process that dies (SIGKILL, power cut,
# OOM kill) costs the others at most. Its holder renews it every third of that.
CLAIM_LEASE_S = 30.0
ENV_CLAIM_LEASE = "EMBEDDING_CACHE_CLAIM_LEASE_S"
# A waiter's first look, and its longest pause between looks.
WAIT_FIRST_S = 0.02
WAIT_MOST_S = 0.1


def lease_from_env() -> float:
    """`CLAIM_LEASE_S`, or the seconds ``EMBEDDING_CACHE_CLAIM_LEASE_S`` names.

    Raises:
        InvalidInputError: the variable is not a positive number.
    """
    return positive_env(ENV_CLAIM_LEASE, CLAIM_LEASE_S, float)


class Claims:
    """Claims of this cache's calls, and the thread that renews them (thread-safe)."""

    def __init__(self, storage: Store, *, lease_s: float = CLAIM_LEASE_S) -> None:
        self.table = ClaimTable(storage)
        self.lease_s = lease_s
        self._lock = threading.Lock()
        self._held: dict[int, str] = {}  # owner -> shard, of the claims being worked on
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()
        # Notified whenever a call of this process stored a slice: its waiters look again.
        self.stored = threading.Condition()

    def claim(self, shard: str, keys: Sequence[bytes], *, since: float) -> Claim:
        """Claim the keys no other call holds, renewed until `release`; ``since`` is when
        the caller looked them up (see `ClaimTable.claim`).

        Raises:
            ReadOnlyStorageError: a store that cannot be written takes no claims.
            StorageError: the claim could not be written.
        """
        taken = self.table.claim(shard, keys, self.lease_s, since=since)
        if taken.won.any():
            with self._lock:
                self._held[taken.owner] = shard
                if self._renewer is None:
                    self._stop.clear()
                    self._renewer = threading.Thread(
                        target=self._renew, name="embeddingcache-claims", daemon=True
                    )
                    self._renewer.start()
        return taken

    def held(self, shard: str, keys: Sequence[bytes]) -> np.ndarray:
        """Which of ``keys`` a live claim holds (see `ClaimTable.held`)."""
        return self.table.held(shard, keys)

    def release(self, shard: str, claim: Claim) -> None:
        """Let a claim go (a failure is logged: the claim then ends with its lease)."""
        with self._lock:
            if self._held.pop(claim.owner, None) is None:
                return
        try:
            self.table.release(shard, claim.owner)
        except StorageError as exc:
            logger.warning("could not let a claim go (it ends with its lease): %s", exc)

    def notify_stored(self) -> None:
        with self.stored:
            self.stored.notify_all()

    def wait_stored(self, timeout: float) -> None:
        """Wait until a call of this process stores a slice, or ``timeout`` seconds."""
        with self.stored:
            self.stored.wait(timeout)

    def close(self) -> None:
        """Stop renewing (the claims still held end with their lease)."""
        with self._lock:
            renewer, self._renewer = self._renewer, None
        self._stop.set()
        if renewer is not None:
            renewer.join()

    def _renew(self) -> None:
        """Renew every held claim each third of a lease, until none is held."""
        while not self._stop.wait(self.lease_s / 3):
            with self._lock:
                by_shard: dict[str, list[int]] = {}
                for owner, shard in self._held.items():
                    by_shard.setdefault(shard, []).append(owner)
                if not by_shard:
                    self._renewer = None
                    return
            for shard, owners in by_shard.items():
                try:
                    self.table.renew(shard, owners, self.lease_s)
                except StorageError as exc:  # the next round tries again, within the lease
                    logger.warning("could not renew %d claim(s): %s", len(owners), exc)
