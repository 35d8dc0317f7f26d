"""A client of OpenAI's ``POST /embeddings``, for OpenAI and every server that speaks it.

What a careful API client does (openai-python's ``_base_client.py`` is the model): base64 on the
wire (float32 bytes, exact and four times smaller than JSON floats); retries with tenacity on
408, 409, 429, 5xx and connection errors only, honouring ``retry-after-ms`` and ``Retry-After``
before its own backoff, bounded by attempts and by total time, the last error re-raised as an
`APIError`; 400, 401, 403 and 404 fail at once, naming the endpoint and the model. Every answer
is checked before a vector of it is returned: one vector per input, indexes complete, one
dimension, finite numbers.

The API key is held by the HTTP client's headers only: it is never in a message, a log line or a
``repr``. It is checked first (`embeddingcache.credentials.clean`: a key a header cannot carry
is one `InvalidInputError`, never a request), every message that quotes the server or httpx is
masked (`embeddingcache.credentials.mask`), and a foreign error is kept as the cause only when
it shows no secret. A request httpx could not write is not retried: it never will be.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import tenacity

from ._util import first_non_finite
from ._version import __version__
from .credentials import clean, clean_cause, mask
from .errors import ProviderError
from .models import OPENAI_BASE_URL, endpoint_of

__all__ = ["APIError", "OpenAIClient", "endpoint_of"]

logger = logging.getLogger("embeddingcache.openai")

RETRIED_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
# Bounds on retrying one request: attempts, total seconds, and the longest single wait (a
# server's Retry-After beyond it is capped, as openai-python caps it).
MAX_ATTEMPTS = 5
MAX_RETRY_SECONDS = 60.0
MAX_WAIT_S = 20.0
# Tests shrink every wait by this factor, so a retry test takes milliseconds.
WAIT_SCALE = 1.0


class APIError(ProviderError):
    """The API refused a request, could not be reached, or answered something unusable.

    ``status`` is the HTTP status of a refusal, ``None`` when there was no usable answer;
    ``retried`` is whether the failure was of the kind that is retried.
    """

    def __init__(self, message: str, *, status: int | None = None, retried: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retried = retried


class _Retryable(Exception):
    """A failure worth another attempt, with the wait the server asked for, if any."""

    def __init__(self, error: APIError, wait_s: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.wait_s = wait_s


class OpenAIClient:
    """Embeds batches of texts with one model at one OpenAI-compatible endpoint."""

    def __init__(
        self,
        base_url: str = OPENAI_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        in_flight: int = 4,
        max_attempts: int = MAX_ATTEMPTS,
        max_retry_seconds: float = MAX_RETRY_SECONDS,
    ) -> None:
        self.endpoint = endpoint_of(base_url)  # refuses credentials in the URL
        api_key = clean(api_key, "api_key")
        self._secrets = (api_key,)
        headers = {"User-Agent": f"embeddingcache/{__version__}", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # The query (an Azure deployment's api-version) as given, after the path: httpx
        # would append a relative path to a base URL's text, query included (issue 30).
        parts = urlsplit(base_url.strip())
        path = parts.path.rstrip("/") + "/embeddings"
        self._url = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self.in_flight = in_flight
        self.max_attempts = max_attempts
        self.max_retry_seconds = max_retry_seconds

    def __repr__(self) -> str:
        return f"OpenAIClient({self.endpoint!r})"

    def close(self) -> None:
        self._client.close()

    def embed(
        self,
        model: str,
        texts: Sequence[str],
        *,
        dimensions: int | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """One request's vectors, ``(len(texts), dim)`` float32 in input order, retried as the
        module says (at most ``max_attempts`` attempts, the client's by default), each attempt
        waiting ``timeout`` seconds at most (the client's by default).

        Raises:
            APIError: the request was refused, or failed after its retries, or its answer
                was not one finite vector of one dimension per text.
        """
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Retryable),
            stop=tenacity.stop_after_attempt(max_attempts or self.max_attempts)
            | tenacity.stop_after_delay(self.max_retry_seconds),
            wait=_wait,
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._once(model, texts, dimensions, timeout)
        except _Retryable as failed:
            raise failed.error from failed.error.__cause__
        raise AssertionError("unreachable")  # pragma: no cover

    def embed_batches(
        self, model: str, batches: Iterable[Sequence[str]], *, dimensions: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(batch index, vectors)`` for each batch, as its answer arrives, with at most
        ``in_flight`` requests open at once: the caller stores each as it comes, so that an
        interrupted run keeps every vector already paid for. A failure stops sending and
        is raised once the requests in flight have ended."""
        pending: dict[Future[np.ndarray], int] = {}
        numbered = iter(enumerate(batches))
        with ThreadPoolExecutor(self.in_flight, thread_name_prefix="embeddingcache-api") as pool:
            try:
                for _ in range(self.in_flight):
                    if not self._submit(pool, pending, model, numbered, dimensions):
                        break
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        index = pending.pop(future)
                        vectors = future.result()
                        self._submit(pool, pending, model, numbered, dimensions)
                        yield index, vectors
            finally:
                for future in pending:
                    future.cancel()

    def _submit(
        self,
        pool: ThreadPoolExecutor,
        pending: dict[Future[np.ndarray], int],
        model: str,
        batches: Iterator[tuple[int, Sequence[str]]],
        dimensions: int | None,
    ) -> bool:
        for index, batch in batches:
            pending[pool.submit(self.embed, model, batch, dimensions=dimensions)] = index
            return True
        return False

    def _once(
        self, model: str, texts: Sequence[str], dimensions: int | None, timeout: float | None
    ) -> np.ndarray:
        body: dict[str, Any] = {"model": model, "input": list(texts), "encoding_format": "base64"}
        if dimensions is not None:
            body["dimensions"] = dimensions
        where = f"{self.endpoint}/embeddings (model {model!r})"
        failed: httpx.TransportError | None = None
        try:
            response = self._client.post(
                self._url,
                json=body,
                timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
            )
        except httpx.TransportError as exc:
            failed = exc
        if failed is not None:
            # Raised out of the except block: the error chains to what `_no_answer` keeps.
            raise self._no_answer(where, failed)
        if response.status_code != 200:
            said = mask(_server_message(response), self._secrets)
            message = f"{where}: HTTP {response.status_code}: {said}"
            if response.status_code in RETRIED_STATUSES:
                error = APIError(message, status=response.status_code, retried=True)
                raise _Retryable(error, _asked_wait(response.headers))
            raise APIError(message, status=response.status_code)
        try:
            return _vectors(response, len(texts), dimensions)
        except ValueError as exc:
            raise APIError(f"{where}: unusable answer: {exc}") from exc

    def _no_answer(self, where: str, exc: httpx.TransportError) -> Exception:
        """The error for a request that got no answer, masked, chained to ``exc`` only when
        it shows no secret: retried after a timeout or a dropped connection, not when httpx
        could not write the request (it never will)."""
        detail = mask(f"{type(exc).__name__}: {exc}", self._secrets)
        cause = clean_cause(exc, self._secrets)
        if isinstance(exc, (httpx.LocalProtocolError, httpx.UnsupportedProtocol)):
            refused = APIError(f"{where}: the request could not be sent ({detail})")
            refused.__cause__ = cause
            return refused
        error = APIError(f"{where}: no answer ({detail})", retried=True)
        error.__cause__ = cause
        retry = _Retryable(error)
        retry.__cause__ = cause
        return retry


def _server_message(response: httpx.Response) -> str:
    """The ``error.message`` of an OpenAI-shaped error body, else the start of the body."""
    try:
        body = response.json()
        message = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
        return str(message)[:500]
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or "(empty body)"


def _vectors(response: httpx.Response, count: int, dimensions: int | None) -> np.ndarray:
    """The vectors of an answer, checked: one per input, each index once, one dimension."""
    try:
        body = json.loads(response.content)
    except ValueError:
        raise ValueError("the body is not JSON (truncated?)") from None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ValueError("no 'data' list")
    if len(data) != count:
        raise ValueError(f"{len(data)} vectors for {count} inputs")
    rows: list[np.ndarray | None] = [None] * count
    for item in data:
        index = item.get("index") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < count or rows[index] is not None:
            raise ValueError(f"index {index!r} is missing, repeated or out of range")
        rows[index] = _vector(item.get("embedding"), index)
    widths = {row.shape[0] for row in rows if row is not None}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(f"vectors of dimensions {sorted(widths)} in one answer")
    (width,) = widths
    if dimensions is not None and width != dimensions:
        raise ValueError(f"dimension {width}, asked for {dimensions}")
    vectors = np.stack([row for row in rows if row is not None])
    bad = first_non_finite(vectors)
    if bad is not None:
        raise ValueError(f"the vector at index {bad} has a non-finite value")
    return vectors


def _vector(embedding: object, index: int) -> np.ndarray:
    if isinstance(embedding, str):
        try:
            raw = base64.b64decode(embedding, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"index {index}: the embedding is not base64") from None
        if len(raw) % 4:
            raise ValueError(f"index {index}: {len(raw)} bytes is not a float32 vector")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    # A server that ignores encoding_format answers JSON floats.
    if isinstance(embedding, list) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in embedding
    ):
        return np.asarray(embedding, dtype=np.float32)
    raise ValueError(f"index {index}: the embedding is neither base64 nor a list of numbers")


def _asked_wait(headers: httpx.Headers) -> float | None:
    """The wait a 429 or 503 asks for, from ``retry-after-ms`` or ``Retry-After``."""
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError):
        return None


def _wait(state: tenacity.RetryCallState) -> float:
    """The server's asked-for wait when it gave one (capped), else exponential backoff with
    jitter, as openai-python waits."""
    failed = state.outcome.exception() if state.outcome else None
    asked = failed.wait_s if isinstance(failed, _Retryable) else None
    if asked is not None and 0 <= asked <= MAX_WAIT_S:
        return asked * WAIT_SCALE
    backoff: float = min(0.5 * 2.0 ** (state.attempt_number - 1), 8.0)
    return backoff * (1 - 0.25 * random.random()) * WAIT_SCALE


def _log_retry(state: tenacity.RetryCallState) -> None:
    failed = state.outcome.exception() if state.outcome else None
    logger.warning(
        "retrying after attempt %d: %s",
        state.attempt_number,
        failed.error if isinstance(failed, _Retryable) else failed,
    )
