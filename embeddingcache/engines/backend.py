"""The ``backend`` engine: an ``embeddingcache serve`` backend, reached over HTTP with httpx.

One connection pool per cache, a timeout on every request, and no retries: a backend that
does not answer in time is skipped, and the next provider computes. After a network failure
the backend is left alone for ``COOLDOWN_S`` seconds, so that a pipeline of many small calls
does not wait for a dead backend on each one.

The token is stripped and checked first (`embeddingcache.credentials.clean`). Credentials in
the URL (``user:password@``, for a proxy in front of the backend) are sent as httpx sends
them, as Basic auth, but are no part of the URL that httpx logs and messages show.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx
import numpy as np

from .._version import __version__
from ..batching import plan
from ..credentials import clean, clean_cause, mask
from ..errors import InvalidInputError, ProviderError, TextTooLongError
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
from ..protocol import Limits as ServerLimits
from . import EmbedOptions, Engine, EngineSettings, Limits

__all__ = ["COOLDOWN_S", "KIND", "BackendEngine", "BackendError", "create"]

logger = logging.getLogger("embeddingcache.engines.backend")

KIND = "backend"

COOLDOWN_S = 10.0
# How often a client asks the backend which version of a model it serves (answers say it too).
VERSION_CHECK_S = 30.0
# Texts per request: a lookup answers thousands quickly; a computing backend should answer
# one request well within the timeout. The server's own limits (GET /models) bound both.
LOOKUP_TEXTS = 2048
COMPUTE_TEXTS = 128
# Lookup requests of one call in flight at once: the backend reads and packs one while this
# process unpacks the one before, instead of each side waiting on the other.
LOOKUPS_IN_FLIGHT = 2
# Bytes of body per request, at most: texts count 4 bytes a character (UTF-8's worst).
REQUEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class _Bounds:
    max_texts: int = ServerLimits.max_texts
    max_text_chars: int = ServerLimits.max_text_chars
    max_body_bytes: int = ServerLimits.max_body_bytes


class BackendError(ProviderError):
    """The backend could not be reached, refused the request, or answered nonsense.

    ``status`` is the HTTP status of a refusal, ``None`` when there was no answer.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def create(settings: EngineSettings) -> BackendEngine:
    """The registry's factory.

    Raises:
        InvalidInputError: no backend URL is configured.
    """
    if settings.remote_url is None:
        raise InvalidInputError("the backend engine needs remote_url (EMBEDDING_CACHE_URL)")
    return BackendEngine(settings.remote_url, timeout=settings.timeout, token=settings.token)


class BackendEngine(Engine):
    """Asks a backend for vectors: stored ones only (`lookup`), or computed
    (`embed`), and offers it vectors computed here (`push`)."""

    kind = KIND
    limits = Limits(batch_inputs=COMPUTE_TEXTS)
    versioned_by = "backend"
    answers_lookups = True

    def __init__(self, url: str, *, timeout: float, token: str | None = None) -> None:
        token = clean(token, "token")
        parts = urlsplit(url)
        auth = None
        if "@" in parts.netloc:
            auth = httpx.BasicAuth(unquote(parts.username or ""), unquote(parts.password or ""))
        self.url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        self._secrets = (token, parts.password)
        headers = {"Accept": MSGPACK, "User-Agent": f"embeddingcache/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, auth=auth)
        self.timeout = timeout
        self._down_until = 0.0
        self._down_because = ""
        self._server_bounds: _Bounds | None = None
        self._versions: dict[str, str] = {}  # model -> the version its last answer named
        self._versions_asked: dict[str, float] = {}  # model -> when GET /models was asked
        self._lock = threading.Lock()

    def lookup(
        self, spec: ModelSpec, texts: Sequence[str], *, prompt: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """The backend's stored vectors of ``prompt + text``: ``(vectors, found)``, where
        rows with ``found`` false hold zeros. Computes nothing. A text longer than the
        server takes is not asked for (not found).

        Raises:
            BackendError: the backend is unreachable, slow, or refused the request.
        """
        bounds = self._bounds()
        asked = [i for i, text in enumerate(texts) if len(text) <= bounds.max_text_chars]
        if len(asked) == len(texts):
            return self._embed(spec, texts, prompt=prompt, lookup_only=True, truncate=False)
        found = np.zeros(len(texts), dtype=bool)
        if not asked:
            return np.zeros((len(texts), 0), dtype=np.float32), found
        part, had = self._embed(
            spec, [texts[i] for i in asked], prompt=prompt, lookup_only=True, truncate=False
        )
        vectors = np.zeros((len(texts), part.shape[1]), dtype=np.float32)
        vectors[asked] = part
        found[asked] = had
        return vectors, found

    def embed(
        self, spec: ModelSpec, texts: Sequence[str], *, prompt: str, options: EmbedOptions
    ) -> np.ndarray:
        vectors, _ = self._embed(
            spec, texts, prompt=prompt, lookup_only=False, truncate=options.truncate
        )
        return vectors

    def count_tokens(self, spec: ModelSpec, texts: Sequence[str]) -> list[int] | None:
        return None  # the backend's tokenizer is not at hand here

    def version(self, spec: ModelSpec, *, fresh: bool = False) -> str | None:
        """The version of the model the backend serves: what its last answer named, asked
        for (GET /models) on first use and again every ``VERSION_CHECK_S``; ``None`` from a
        backend that cannot be reached or does not say."""
        now = time.monotonic()
        with self._lock:
            asked = self._versions_asked.get(spec.name)
            due = asked is None or now - asked >= VERSION_CHECK_S
            if due:
                self._versions_asked[spec.name] = now
        if due:
            try:
                answer = json.loads(self._request("GET", "/models", None))
                for model in answer.get("models", []):
                    if model.get("name") == spec.name and isinstance(model.get("version"), str):
                        self._versions[spec.name] = model["version"]
            except (BackendError, ValueError, AttributeError) as exc:
                logger.debug("backend version of %r: %s", spec.name, exc)
        return self._versions.get(spec.name)

    def dimension(self, spec: ModelSpec) -> int:
        """The dimension the backend gives for the model (GET /models).

        Raises:
            BackendError: the backend is unreachable, or does not serve the model.
        """
        answer = self._request("GET", "/models", None)
        try:
            for model in json.loads(answer).get("models", []):
                if model.get("name") == spec.name and isinstance(model.get("dimensions"), int):
                    return int(model["dimensions"])
        except (ValueError, AttributeError):
            pass
        raise BackendError(f"the backend at {self.url} does not serve model {spec.name!r}")

    def push(
        self,
        spec: ModelSpec,
        texts: Sequence[str],
        vectors: np.ndarray,
        *,
        prompt: str,
        version: str | None = None,
    ) -> int:
        """Offer vectors computed here, at the model's ``version``, to the backend's cache;
        the number it accepted.

        Raises:
            BackendError: the backend is unreachable, or refused (it was started without
                ``--allow-push``, found the vectors invalid, or serves another version).
        """
        accepted = 0
        for start, stop in self._chunks(texts, COMPUTE_TEXTS, extra_bytes=4 * vectors.shape[1]):
            body = {
                "texts": list(texts[start:stop]),
                "model": spec.name,
                "normalized": True,
                "prompt": prompt,
                "embeddings": encode_vectors(vectors[start:stop], None, MSGPACK),
            }
            if version is not None:
                body["version"] = version
            answer = self._post("/push", body)
            accepted += int(answer.get("accepted", 0)) if isinstance(answer, dict) else 0
        return accepted

    def close(self) -> None:
        self._client.close()

    # -- requests -------------------------------------------------------------------------

    def _embed(
        self,
        spec: ModelSpec,
        texts: Sequence[str],
        *,
        prompt: str,
        lookup_only: bool,
        truncate: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        per_request = LOOKUP_TEXTS if lookup_only else COMPUTE_TEXTS
        ranges = list(self._chunks(texts, per_request))

        def answer(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
            request = EmbedRequest(
                texts=list(texts[start:stop]),
                model=spec.name,
                normalized=True,
                prompt=prompt,
                lookup_only=lookup_only,
                truncate=truncate,
            )
            try:
                body = self._post("/embed", request.to_wire())
            except TextTooLongError as exc:
                raise exc.at(start + exc.index) from None
            return self._vectors(body, spec, stop - start, lookup_only)

        if lookup_only and len(ranges) > 1:
            # In input order; the first failure is raised once the requests in flight end.
            with ThreadPoolExecutor(LOOKUPS_IN_FLIGHT, thread_name_prefix="ec-lookup") as pool:
                answers = list(pool.map(lambda r: answer(*r), ranges))
        else:  # a computing backend is asked one request at a time, as it bounds its work
            answers = [answer(start, stop) for start, stop in ranges]
        parts = [vectors for vectors, _ in answers]
        masks = [found for _, found in answers]
        if len({part.shape[1] for part in parts}) > 1:
            raise BackendError(f"the backend at {self.url} answered vectors of two dimensions")
        return np.concatenate(parts), np.concatenate(masks)

    def _chunks(
        self, texts: Sequence[str], per_request: int, *, extra_bytes: int = 0
    ) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` ranges of texts that fit one request to this server."""
        bounds = self._bounds()
        return plan(
            (4 * len(text) + extra_bytes + 16 for text in texts),
            most=min(per_request, bounds.max_texts),
            budget=min(REQUEST_BYTES, bounds.max_body_bytes // 2),
        )

    def _bounds(self) -> _Bounds:
        """The server's limits, asked once (GET /models); the defaults if it does not say."""
        if self._server_bounds is None:
            answer = self._request("GET", "/models", None)
            try:
                limits = json.loads(answer).get("limits", {})
                self._server_bounds = _Bounds(
                    **{
                        name: value
                        for name, value in limits.items()
                        if name in _Bounds.__dataclass_fields__
                        and isinstance(value, int)
                        and value > 0
                    }
                )
            except (ValueError, AttributeError):
                self._server_bounds = _Bounds()
        return self._server_bounds

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
            version = answer.get("version")
            if version is not None and not isinstance(version, str):
                raise ProtocolError(502, f"version is {version!r}")
            if version is not None:
                self._versions[spec.name] = version
            return decode_vectors(
                items, dimension, MSGPACK, field="embeddings", allow_missing=lookup_only
            )
        except ProtocolError as exc:
            raise BackendError(
                f"the backend at {self.url} sent an invalid answer for {spec.name!r}: {exc}"
            ) from None

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        content = self._request("POST", path, encode_body(body, MSGPACK))
        try:
            return decode_body(content, MSGPACK)
        except ProtocolError as exc:
            raise BackendError(
                f"the backend at {self.url} sent an unreadable answer: {exc}"
            ) from None

    def _request(self, method: str, path: str, content: bytes | None) -> bytes:
        """The body of a 200 answer that arrived within the timeout, all of it."""
        with self._lock:
            if time.monotonic() < self._down_until:
                raise BackendError(f"{self._down_because}; not asked again for {COOLDOWN_S:g} s")
        deadline = time.monotonic() + self.timeout
        headers = {"Content-Type": MSGPACK} if content is not None else {}
        failed: httpx.HTTPError | None = None
        try:
            with self._client.stream(method, path, content=content, headers=headers) as response:
                chunks = []
                # httpx times each read; a backend that trickles its answer is cut here.
                for chunk in response.iter_bytes():
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout(f"no full answer within {self.timeout:g} s")
        except httpx.HTTPError as exc:
            failed = exc
        if failed is not None:
            # Unreachable, refused, reset or too slow: skip this backend for a while.
            # (Raised out of the except block: the error chains to `clean_cause`'s only.)
            detail = mask(f"{type(failed).__name__}: {failed}", self._secrets)
            because = f"the backend at {self.url} did not answer: {detail}"
            with self._lock:
                self._down_until = time.monotonic() + COOLDOWN_S
                self._down_because = because
            error = BackendError(because)
            error.__cause__ = clean_cause(failed, self._secrets)
            raise error
        body = b"".join(chunks)
        if response.status_code != 200:
            raise _refusal(self.url, response.status_code, response.reason_phrase, body)
        return body


def _refusal(url: str, status: int, reason: str, body: bytes) -> Exception:
    """The error for a non-200 answer, with the server's own words when it gave some."""
    detail: Any = None
    with contextlib.suppress(ValueError):
        detail = json.loads(body)
    message = detail.get("detail") if isinstance(detail, dict) else None
    if isinstance(detail, dict) and detail.get("error") == "too_many_tokens":
        index = detail.get("index")
        if isinstance(index, int) and isinstance(message, str):
            return TextTooLongError(message, index=index)
    return BackendError(
        f"the backend at {url} answered {status}: {message or reason}", status=status
    )
