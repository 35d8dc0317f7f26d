"""The wire format between the client and ``embeddingcache serve``, shared by both sides.

Bodies are msgpack (``application/msgpack``, the default) or JSON (``application/json``); a
response uses the format of its request. In msgpack a vector is its float32 little-endian
bytes; in JSON, a list of numbers. ``docs/protocol.md`` is the reference; this module is the
one implementation of it, so the server and the client cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from ._util import first_non_finite
from .errors import EmbeddingCacheError, InvalidInputError
from .keys import validate_texts

__all__ = [
    "JSON",
    "MSGPACK",
    "Connections",
    "EmbedRequest",
    "Limits",
    "ProtocolError",
    "PushRequest",
    "decode_body",
    "decode_vectors",
    "encode_body",
    "encode_vectors",
    "media_type",
    "parse_embed_request",
    "parse_push_request",
]

MSGPACK = "application/msgpack"
JSON = "application/json"
MEDIA_TYPES = (MSGPACK, JSON)
# The longest prompt a client may put in front of its texts.
MAX_PROMPT_CHARS = 1000
# The longest vector a pushed body may hold.
MAX_DIMENSIONS = 65536


class ProtocolError(EmbeddingCacheError):
    """A message that does not follow the protocol; ``status`` is the HTTP answer to it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str = "invalid",
        index: int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.index = index
        self.param = param  # the request field at fault, where one is


@dataclass(frozen=True)
class Limits:
    """What one request may hold; the server answers 413 or 422 beyond it, and 408 to a
    body that takes longer than ``body_timeout_s`` to arrive."""

    max_texts: int = 4096
    max_text_chars: int = 100_000
    max_body_bytes: int = 16 * 1024 * 1024
    body_timeout_s: float = 15.0


@dataclass(frozen=True)
class Connections:
    """How long a connection to the server may take and how many may be open (``serve``'s
    options; see `embeddingcache.server.running`)."""

    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_connections: int = 1000

    def __post_init__(self) -> None:
        if self.header_timeout_s <= 0 or self.keep_alive_s < 1 or self.max_connections < 1:
            raise ValueError(f"connection limits must be positive: {self}")


@dataclass(frozen=True)
class EmbedRequest:
    """``POST /embed``: vectors of ``prompt + text`` for each text, computed unless
    ``lookup_only``. ``prompt`` ``None`` means the model's default prompt."""

    texts: list[str]
    model: str | None = None
    normalized: bool = False
    prompt: str | None = None
    lookup_only: bool = False
    truncate: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "texts": self.texts,
            "model": self.model,
            "normalized": self.normalized,
            "prompt": self.prompt,
            "lookup_only": self.lookup_only,
            "truncate": self.truncate,
        }


@dataclass(frozen=True)
class PushRequest:
    """``POST /push``: vectors a client computed, offered to the server's cache."""

    texts: list[str]
    vectors: np.ndarray
    model: str | None = None
    normalized: bool = False
    prompt: str | None = None
    version: str | None = None  # the model's version the vectors were computed at


def media_type(content_type: str | None) -> str:
    """The protocol format named by a Content-Type header, or a 415 ``ProtocolError``."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind in ("application/x-msgpack", "application/vnd.msgpack"):
        kind = MSGPACK
    if kind not in MEDIA_TYPES:
        raise ProtocolError(
            415,
            f"unsupported content type {content_type or '(none)'!r}; send {MSGPACK} or {JSON}",
            code="unsupported_media_type",
        )
    return kind


def decode_body(body: bytes, kind: str, limits: Limits | None = None) -> Any:
    """The object a msgpack or JSON body holds, or a 400 ``ProtocolError``.

    With ``limits`` (a server reading a request), msgpack refuses containers and strings
    larger than a valid request can hold before building them: a few bytes can announce
    millions of items. JSON must be UTF-8 (RFC 8259 for JSON that travels; a UTF-8 byte
    order mark is ignored, as it allows): ``json.loads`` of bytes would take UTF-16 and
    UTF-32 too.
    """
    try:
        if kind == MSGPACK:
            bounds = {}
            if limits is not None:
                bounds = {
                    # An array cannot hold more items than its body has bytes: the bound
                    # refuses no real array, so too many texts get the 422 that says so
                    # (`_texts`), and a header announcing more is refused before msgpack
                    # allocates its list.
                    "max_array_len": len(body),
                    "max_map_len": 64,
                    "max_str_len": max(4 * limits.max_text_chars, 65536),
                    "max_bin_len": 4 * MAX_DIMENSIONS,
                    "max_ext_len": 0,
                }
            return msgpack.unpackb(body, raw=False, strict_map_key=True, **bounds)
        return json.loads(body.decode("utf-8").removeprefix("\ufeff"))
    # A decoder may fail in many ways (bad UTF-8, extra data, nesting too deep, a map key
    # that cannot be hashed): every one of them is the sender's malformed body.
    except Exception as exc:
        name = "msgpack" if kind == MSGPACK else "JSON"
        detail = str(exc)
        if kind == JSON and isinstance(exc, UnicodeDecodeError):
            detail = f"not UTF-8 ({exc.reason} at byte {exc.start}); send JSON as UTF-8"
        raise ProtocolError(400, f"malformed {name} body: {detail}", code="malformed") from None


def encode_body(obj: Any, kind: str) -> bytes:
    if kind == MSGPACK:
        packed: bytes = msgpack.packb(obj, use_bin_type=True)
        return packed
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def encode_vectors(vectors: np.ndarray, present: np.ndarray | None, kind: str) -> list[Any]:
    """One wire item per row of ``vectors``: its little-endian float32 bytes (msgpack) or
    its list of numbers (JSON); ``None`` where ``present`` is false."""
    matrix = np.ascontiguousarray(vectors, dtype="<f4")
    if kind == MSGPACK:
        width = 4 * matrix.shape[1]
        # memoryview slices: msgpack packs them as bin without copying each row first.
        view = memoryview(matrix.tobytes())
        rows: list[Any] = [view[i * width : (i + 1) * width] for i in range(matrix.shape[0])]
    else:
        rows = matrix.tolist()
    if present is not None:
        for i in np.flatnonzero(~present):
            rows[i] = None
    return rows


def decode_vectors(
    items: object, dimension: int, kind: str, *, field: str, allow_missing: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The ``(n, dimension)`` float32 matrix and presence mask of a list of wire vectors.

    Raises a 422 ``ProtocolError`` for a wrong type, a wrong length, or NaN or infinite values.
    """
    if not isinstance(items, list):
        raise ProtocolError(422, f"{field} must be a list, not {_kind_of(items)}")
    width = 4 * dimension
    present = np.ones(len(items), dtype=bool)
    matrix = np.zeros((len(items), dimension), dtype=np.float32)
    blobs: list[bytes] = []  # msgpack rows, copied into the matrix at once below
    for i, item in enumerate(items):
        if item is None and allow_missing:
            present[i] = False
        elif kind == MSGPACK and isinstance(item, bytes):
            if len(item) != width:
                raise ProtocolError(
                    422,
                    f"{field}[{i}] is {len(item)} bytes; a {dimension}-d float32 vector is {width}",
                )
            blobs.append(item)
        elif kind == JSON and isinstance(item, list):
            if len(item) != dimension or not all(_is_number(x) for x in item):
                raise ProtocolError(422, f"{field}[{i}] must be a list of {dimension} numbers")
            try:
                # Beyond float32's range becomes inf, refused below with the other non-finite.
                with np.errstate(over="ignore"):
                    matrix[i] = item
            except OverflowError:
                raise ProtocolError(422, f"{field}[{i}] holds a number out of range") from None
        else:
            expected = "float32 bytes" if kind == MSGPACK else "a list of numbers"
            raise ProtocolError(422, f"{field}[{i}] must be {expected}, not {_kind_of(item)}")
    if blobs:
        # One join instead of a numpy assignment per row; a bytearray keeps it writable.
        rows = np.frombuffer(bytearray().join(blobs), dtype="<f4").reshape(len(blobs), dimension)
        if len(blobs) == len(items):
            matrix = rows
        else:
            matrix[present] = rows
    bad = first_non_finite(matrix)
    if bad is not None:
        raise ProtocolError(422, f"{field}[{bad}] holds NaN or infinite values")
    return matrix, present


def parse_embed_request(obj: object, limits: Limits) -> EmbedRequest:
    """Check a decoded ``POST /embed`` body; a 422 ``ProtocolError`` says what is wrong.

    Fields the protocol does not define are ignored, so that newer clients can talk to
    older servers.
    """
    fields = _fields(obj)
    return EmbedRequest(
        texts=_texts(fields, limits),
        model=_optional_str(fields, "model"),
        normalized=_bool(fields, "normalized"),
        prompt=_prompt(fields),
        lookup_only=_bool(fields, "lookup_only"),
        truncate=_bool(fields, "truncate"),
    )


def parse_push_request(
    obj: object, kind: str, limits: Limits, dimension_of: Callable[[str | None], int]
) -> PushRequest:
    """Check a decoded ``POST /push`` body. ``dimension_of(model)`` gives the served model's
    dimension (and raises a ``ProtocolError`` for a model that is not served)."""
    fields = _fields(obj)
    texts = _texts(fields, limits)
    model = _optional_str(fields, "model")
    dimension = dimension_of(model)
    if "embeddings" not in fields:
        raise ProtocolError(422, "missing field 'embeddings'")
    items = fields["embeddings"]
    if not isinstance(items, list) or len(items) != len(texts):
        raise ProtocolError(422, f"embeddings must be a list of {len(texts)} vectors, one per text")
    vectors, _ = decode_vectors(items, dimension, kind, field="embeddings", allow_missing=False)
    return PushRequest(
        texts=texts,
        vectors=vectors,
        model=model,
        normalized=_bool(fields, "normalized"),
        prompt=_prompt(fields),
        version=_optional_str(fields, "version"),
    )


# -- field checks ------------------------------------------------------------------------


def _fields(obj: object) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ProtocolError(422, f"the body must be a map of fields, not {_kind_of(obj)}")
    return obj


def _texts(fields: Mapping[str, Any], limits: Limits) -> list[str]:
    if "texts" not in fields:
        raise ProtocolError(422, "missing field 'texts' (a list of strings)")
    texts = fields["texts"]
    if not isinstance(texts, list):
        raise ProtocolError(422, f"texts must be a list of strings, not {_kind_of(texts)}")
    if not texts:
        raise ProtocolError(422, "texts is empty; send at least one text")
    if len(texts) > limits.max_texts:
        raise ProtocolError(
            422,
            f"{len(texts)} texts in one request; this server takes at most {limits.max_texts}",
            code="too_many_texts",
        )
    try:
        validate_texts(texts)
    except (InvalidInputError, TypeError) as exc:
        raise ProtocolError(422, str(exc)) from None
    for i, text in enumerate(texts):
        if len(text) > limits.max_text_chars:
            raise ProtocolError(
                422,
                f"texts[{i}] is {len(text)} characters long; this server takes at most "
                f"{limits.max_text_chars}",
                code="text_too_long",
            )
    return list(texts)


def _optional_str(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is not None and not (isinstance(value, str) and value):
        raise ProtocolError(422, f"{name} must be a non-empty string, not {_kind_of(value)}")
    return value


def _prompt(fields: Mapping[str, Any]) -> str | None:
    prompt = fields.get("prompt")
    if prompt is None:
        return None
    if not isinstance(prompt, str):
        raise ProtocolError(422, f"prompt must be a string or null, not {_kind_of(prompt)}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ProtocolError(422, f"prompt is longer than {MAX_PROMPT_CHARS} characters")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(422, "prompt is not valid Unicode (a lone surrogate)") from None
    return prompt


def _bool(fields: Mapping[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(422, f"{name} must be true or false, not {_kind_of(value)}")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind_of(value: object) -> str:
    names = {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        bytes: "binary data",
        list: "a list",
        dict: "a map",
    }
    return names.get(type(value), type(value).__name__)
