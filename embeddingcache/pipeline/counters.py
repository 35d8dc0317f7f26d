"""What this process's calls did, counted: hits and misses, the backend's vectors, what was
computed and pushed, and the tokens computed and saved (per model too)."""

from __future__ import annotations

import threading

from ..storage import Store
from ..versions import model_of

__all__ = ["Counters"]


class Counters:
    """The counts of `EmbeddingCache.stats` (thread-safe). A lookup's hits and misses are
    also handed to the store's use log (`Store.record`)."""

    def __init__(self, storage: Store) -> None:
        self.storage = storage
        self._lock = threading.Lock()
        self._stats = {
            "hits": 0,
            "misses": 0,
            "remote_hits": 0,
            "computed": 0,
            "remote_computed": 0,
            "waited": 0,
            "pushed": 0,
            "not_stored": 0,
            "tokens_computed": 0,
            "tokens_saved": 0,
        }
        self._tokens: dict[str, dict[str, int]] = {}  # model -> tokens computed and saved

    def lookup(self, shard: str, hits: int, misses: int, tokens_saved: int) -> None:
        """A lookup in ``shard`` found ``hits`` texts (which cost ``tokens_saved`` once)."""
        with self._lock:
            stats = self._stats
            stats["hits"] += hits
            stats["misses"] += misses
            if tokens_saved:
                stats["tokens_saved"] += tokens_saved
                self._tokens_of(model_of(shard))["saved"] += tokens_saved
        self.storage.record(shard, hits, misses, tokens_saved)

    def computed_tokens(self, model: str, spent: int) -> None:
        with self._lock:
            self._stats["tokens_computed"] += spent
            self._tokens_of(model)["computed"] += spent

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._stats[name] += amount

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

    def _tokens_of(self, model: str) -> dict[str, int]:
        found = self._tokens.get(model)
        if found is None:
            found = self._tokens[model] = {"computed": 0, "saved": 0}
        return found
