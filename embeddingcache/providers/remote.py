"""The remote provider: an ``embeddingcache serve`` backend, reached over HTTP with httpx.

One connection pool per cache, a timeout on every request, and no retries: a backend that
does not answer in time is skipped, and the next provider computes. After a network failure
the backend is left alone for ``COOLDOWN_S`` seconds, so that a pipeline of many small calls
does not wait for a dead backend on each one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import numpy as np

from .._version import __version__
from ..errors import ProviderError, TextTooLongError
from ..models import ModelSpec
from ..protocol import (
    MSGPACK,
    EmbedRequest,
    ProtocolError,
    decode_body,
    decode_vectors,
    encode_body,
    encode_vectors,
)

__all__ = ["COOLDOWN_S", "BackendError", "RemoteProvider"]

logger = logging.getLogger("embeddingcache.providers.remote")

COOLDOWN_S = 10.0
# Texts per request, and UTF-8 bytes of text per request: well inside the server's default
# limits (4096 texts, 64 MiB), small enough that one answer is a few megabytes.
REQUEST_TEXTS = 1024
REQUEST_TEXT_BYTES = 8 * 1024 * 1024


class BackendError(ProviderError):
    """The backend could not be reached, refused the request, or answered nonsense.

    ``status`` is the HTTP status of a refusal, ``None`` when there was no answer.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RemoteProvider:
    """Asks a backend for vectors: stored ones only (:meth:`lookup`), or computed
    (:meth:`compute`), and offers it vectors computed here (:meth:`push`)."""

    name = "remote"

    def __init__(self, url: str, *, timeout: float, token: str | None = None) -> None:
        self.url = url
        headers = {"Accept": MSGPACK, "User-Agent": f"embeddingcache/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(base_url=url, timeout=timeout, headers=headers)
        self._down_until = 0.0
        self._down_because = ""
        self._lock = threading.Lock()

    def lookup(
        self, spec: ModelSpec, texts: Sequence[str], *, prompt: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """The backend's stored vectors of ``prompt + text``: ``(vectors, found)``, where
        rows with ``found`` false hold zeros. Computes nothing.

        Raises:
            BackendError: the backend is unreachable, slow, or refused the request.
        """
        return self._embed(spec, texts, prompt=prompt, lookup_only=True, truncate=False)

    def compute(
        self,
        spec: ModelSpec,
        texts: Sequence[str],
        *,
        prompt: str,
        batch_size: int,
        show_progress: bool,
        truncate: bool,
    ) -> np.ndarray:
        vectors, _ = self._embed(spec, texts, prompt=prompt, lookup_only=False, truncate=truncate)
        return vectors

    def push(
        self, spec: ModelSpec, texts: Sequence[str], vectors: np.ndarray, *, prompt: str
    ) -> int:
        """Offer vectors computed here to the backend's cache; the number it accepted.

        Raises:
            BackendError: the backend is unreachable, or refused (it was started without
                ``--allow-push``, or found the vectors invalid).
        """
        accepted = 0
        for start, stop in _chunks(texts):
            body = {
                "texts": list(texts[start:stop]),
                "model": spec.name,
                "normalized": True,
                "prompt": prompt,
                "embeddings": encode_vectors(vectors[start:stop], None, MSGPACK),
            }
            answer = self._post("/push", body)
            accepted += int(answer.get("accepted", 0)) if isinstance(answer, dict) else 0
        return accepted

    def close(self) -> None:
        self._client.close()

    # -- one request ----------------------------------------------------------------------

    def _embed(
        self,
        spec: ModelSpec,
        texts: Sequence[str],
        *,
        prompt: str,
        lookup_only: bool,
        truncate: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        parts: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        for start, stop in _chunks(texts):
            request = EmbedRequest(
                texts=list(texts[start:stop]),
                model=spec.name,
                normalized=True,
                prompt=prompt,
                lookup_only=lookup_only,
                truncate=truncate,
            )
            try:
                answer = self._post("/embed", request.to_wire())
            except TextTooLongError as exc:
                raise TextTooLongError(exc.detail, index=start + exc.index) from None
            vectors, found = self._vectors(answer, spec, stop - start, lookup_only)
            parts.append(vectors)
            masks.append(found)
        if len({part.shape[1] for part in parts}) > 1:
            raise BackendError(f"the backend at {self.url} answered vectors of two dimensions")
        return np.concatenate(parts), np.concatenate(masks)

    def _vectors(
        self, answer: Any, spec: ModelSpec, n: int, lookup_only: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        try:
            if not isinstance(answer, dict):
                raise ProtocolError(502, "the answer is not a map")
            dimension = answer.get("dimensions")
            if not isinstance(dimension, int) or isinstance(dimension, bool) or dimension < 1:
                raise ProtocolError(502, f"dimensions is {dimension!r}")
            items = answer.get("embeddings")
            if not isinstance(items, list) or len(items) != n:
                raise ProtocolError(502, f"expected {n} embeddings")
            return decode_vectors(
                items, dimension, MSGPACK, field="embeddings", allow_missing=lookup_only
            )
        except ProtocolError as exc:
            raise BackendError(
                f"the backend at {self.url} sent an invalid answer for {spec.name!r}: {exc}"
            ) from None

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        with self._lock:
            if time.monotonic() < self._down_until:
                raise BackendError(f"{self._down_because}; not asked again for {COOLDOWN_S:g} s")
        try:
            response = self._client.post(
                path, content=encode_body(body, MSGPACK), headers={"Content-Type": MSGPACK}
            )
        except httpx.HTTPError as exc:
            # Unreachable, refused, reset or too slow: skip this backend for a while.
            because = f"the backend at {self.url} did not answer: {type(exc).__name__}: {exc}"
            with self._lock:
                self._down_until = time.monotonic() + COOLDOWN_S
                self._down_because = because
            raise BackendError(because) from exc
        if response.status_code != 200:
            raise _refusal(self.url, response)
        try:
            return decode_body(response.content, MSGPACK)
        except ProtocolError as exc:
            raise BackendError(
                f"the backend at {self.url} sent an unreadable answer: {exc}"
            ) from None


def _refusal(url: str, response: httpx.Response) -> Exception:
    """The error for a non-200 answer, with the server's own words when it gave some."""
    detail: Any = None
    with contextlib.suppress(ValueError):
        detail = response.json()
    message = detail.get("detail") if isinstance(detail, dict) else None
    if isinstance(detail, dict) and detail.get("error") == "too_many_tokens":
        index = detail.get("index")
        if isinstance(index, int) and isinstance(message, str):
            return TextTooLongError(message, index=index)
    return BackendError(
        f"the backend at {url} answered {response.status_code}: "
        f"{message or response.reason_phrase}",
        status=response.status_code,
    )


def _chunks(texts: Sequence[str]) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges of at most ``REQUEST_TEXTS`` texts and about
    ``REQUEST_TEXT_BYTES`` bytes each."""
    start, size = 0, 0
    for i, text in enumerate(texts):
        size += len(text)
        if i > start and (i - start >= REQUEST_TEXTS or size > REQUEST_TEXT_BYTES):
            yield start, i
            start, size = i, len(text)
    if start < len(texts):
        yield start, len(texts)
