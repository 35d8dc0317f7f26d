"""The providers that compute misses, in the caller's order, and the engines behind them.

The one place that knows the chain's words: ``"local"`` is the model's own engine on this
machine (a model loaded here, or an API called with this machine's key), ``"remote"`` the
team backend computing. Engines are created on first use; the backend's HTTP client too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from ..engines import Engine, EngineSettings, create
from ..errors import AllProvidersFailedError, InvalidInputError, ProviderError
from ..models import ModelSpec

if TYPE_CHECKING:
    from ..engines.backend import BackendEngine

__all__ = ["CHAINS", "LOCAL", "REMOTE", "Chain"]

LOCAL = "local"
REMOTE = "remote"
# Who computes misses, by default: this machine first, then the team backend.
CHAINS = (LOCAL, REMOTE)


class Chain:
    """The providers of a cache, in order, and their engines (thread-safe)."""

    def __init__(self, settings: EngineSettings, names: Sequence[str] = CHAINS) -> None:
        self.settings = settings
        self.names = tuple(names)
        self._lock = threading.Lock()
        self._engines: dict[str, Engine] = {}
        self._backend: BackendEngine | None = None
        self._dimensions: dict[str, int] = {}  # of models whose engine said

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

    def local(self, spec: ModelSpec) -> Engine | None:
        """This machine's engine for ``spec`` when the chain computes here and one is
        registered for its kind (else the compute step says what is missing)."""
        if LOCAL not in self.names:
            return None
        try:
            return self.engine(spec)
        except InvalidInputError:
            return None

    def backend(self) -> BackendEngine | None:
        """The team backend, when one is configured (httpx is imported on first use)."""
        if self.settings.remote_url is None:
            return None
        with self._lock:
            if self._backend is None:
                from ..engines.backend import create as backend_engine

                self._backend = backend_engine(self.settings)
            return self._backend

    def loaded(self) -> dict[str, Engine]:
        """The engines created so far, by kind (the backend's apart)."""
        with self._lock:
            return dict(self._engines)

    def lead(self, spec: ModelSpec) -> tuple[str, Engine] | None:
        """The first provider of the chain that is configured here, and its engine (None:
        none is)."""
        for name in self.names:
            if name == REMOTE:
                remote = self.backend()
                if remote is not None:
                    return name, remote
                continue
            try:
                return name, self.engine(spec)
            except InvalidInputError:
                continue  # no such engine here: the compute step says so
        return None

    def links(self, spec: ModelSpec) -> Iterator[tuple[str, Engine | None]]:
        """Each provider's name and engine, in order (``None``: not configured here).

        Raises:
            InvalidInputError: no engine of the spec's kind is registered.
        """
        for name in self.names:
            yield name, (self.backend() if name == REMOTE else self.engine(spec))

    def all_failed(
        self, spec: ModelSpec, tried: list[str], failed: list[tuple[str, ProviderError]]
    ) -> AllProvidersFailedError:
        """The one error of a call that nobody could compute: what was tried, and the fixes
        each failure calls for."""
        tried = [f"{name} ({exc.reason})" for name, exc in failed] + tried
        fixes = [exc.fix for _, exc in failed if exc.fix]
        backend_helps = all(exc.backend_helps for _, exc in failed)
        if LOCAL not in self.names:
            fixes.append(f"add {LOCAL!r} to fallback_providers to compute them here")
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

    def learned_dimension(self, spec: ModelSpec, dimension: int) -> None:
        with self._lock:
            self._dimensions[spec.name] = dimension

    def dimension_said(self, spec: ModelSpec) -> int | None:
        """The dimension the model's engine said in this process, if it did."""
        return self._dimensions.get(spec.name)

    def close(self) -> None:
        """Close every engine and the backend's client."""
        with self._lock:
            engines: list[Engine] = list(self._engines.values())
            if self._backend is not None:
                engines.append(self._backend)
            self._engines, self._backend = {}, None
        for engine in engines:
            engine.close()
