"""OpenAI's embeddings API, as ``serve`` speaks it: ``POST /v1/embeddings`` and ``GET /v1/models``.

Requests are checked here and every mistake is a 400 naming the field (and the index of a bad
input), in OpenAI's error shape; see docs/protocol.md for what is supported. Nothing here
touches the cache: the server computes what `parse_request` accepted and renders it with
`response_body`.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import TextTooLongError
from .protocol import Limits, ProtocolError

__all__ = [
    "INPUT_TYPES",
    "OpenAIRequest",
    "check_dimensions",
    "error_body",
    "model_item",
    "models_body",
    "parse_request",
    "response_body",
    "shorten",
    "too_long",
]

# The extension field that picks a prompt (as NVIDIA's and Voyage's APIs name it), and the
# prompt name of the model's each value asks for.
INPUT_TYPES: Mapping[str, tuple[str, ...]] = {
    "query": ("query",),
    "document": ("document", "passage"),
    "passage": ("passage", "document"),
}
ENCODINGS = ("float", "base64")
# OpenAI's error type for each status, as its clients show it.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
}


@dataclass(frozen=True)
class OpenAIRequest:
    model: str
    texts: list[str]
    single: bool  # the input was one string, not a list
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    input_type: str | None = None  # a key of INPUT_TYPES
    truncate: bool | None = None  # None: the server's default (serve --truncate)


def _bad(message: str, param: str, index: int | None = None) -> ProtocolError:
    return ProtocolError(400, message, code="invalid_value", index=index, param=param)


def parse_request(obj: Any, limits: Limits) -> OpenAIRequest:
    """A checked ``/v1/embeddings`` body, or a 400 `ProtocolError` naming what is wrong."""
    if not isinstance(obj, dict):
        raise _bad(f"the body must be a JSON object, not {type(obj).__name__}", "body")
    model = obj.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("'model' is required: the name of a model this server serves", "model")
    if "input" not in obj:
        raise _bad("'input' is required: a string or a list of strings", "input")
    texts, single = _inputs(obj["input"], limits)
    encoding = obj.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODINGS:
        raise _bad(
            f"encoding_format must be 'float' or 'base64', not {encoding!r}", "encoding_format"
        )
    dimensions = obj.get("dimensions")
    if dimensions is not None and (
        not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1
    ):
        raise _bad(f"dimensions must be a positive integer, not {dimensions!r}", "dimensions")
    input_type = obj.get("input_type")
    # A list or an object is no key of INPUT_TYPES, and hashing it would raise: a 500.
    if input_type is not None and (
        not isinstance(input_type, str) or input_type not in INPUT_TYPES
    ):
        known = ", ".join(repr(k) for k in INPUT_TYPES)
        raise _bad(f"input_type must be one of {known}, not {input_type!r}", "input_type")
    truncate = obj.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise _bad(f"truncate must be true or false, not {truncate!r}", "truncate")
    user = obj.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad(f"user must be a string, not {type(user).__name__}", "user")
    return OpenAIRequest(model, texts, single, encoding, dimensions, input_type, truncate)


def _inputs(value: Any, limits: Limits) -> tuple[list[str], bool]:
    single = isinstance(value, str)
    items = [value] if single else value
    if not isinstance(items, list):
        raise _bad(
            f"'input' must be a string or a list of strings, not {type(value).__name__}", "input"
        )
    if not items:
        raise _bad("'input' is empty; send at least one string", "input")
    kinds = set(map(type, items))
    if kinds <= {int} or list in kinds:
        raise _bad(
            "token arrays are not accepted: this cache keys vectors by text, so send the "
            "strings themselves (with LangChain's OpenAIEmbeddings, pass "
            "check_embedding_ctx_length=False)",
            "input",
        )
    if len(items) > limits.max_texts:
        raise _too_many(len(items), limits)
    if kinds != {str} or not _all_fit(items, limits.max_text_chars):
        _refuse_first_bad(items, single, limits)
    _check_encodable(items, single)
    return list(items), single


def _refuse_first_bad(items: list[Any], single: bool, limits: Limits) -> None:
    """Raise the 400 naming the first input that is not a string, blank, or too long."""
    for i, text in enumerate(items):
        where = "'input'" if single else f"input[{i}]"
        if not isinstance(text, str):
            raise _bad(f"{where} must be a string, not {type(text).__name__}", "input", i)
        if not text.strip():
            raise _bad(f"{where} is empty or only whitespace", "input", i)
        if len(text) > limits.max_text_chars:
            raise _bad(
                f"{where} is {len(text)} characters long; this server takes at most "
                f"{limits.max_text_chars}",
                "input",
                i,
            )


def _all_fit(texts: list[str], max_chars: int) -> bool:
    """Whether every text is non-blank and short enough, in a few passes of C code
    (`_refuse_first_bad`'s loop runs only to name the first that is not)."""
    return all(texts) and not any(map(str.isspace, texts)) and max(map(len, texts)) <= max_chars


def _too_many(n: int, limits: Limits) -> ProtocolError:
    return ProtocolError(
        400,
        f"{n} inputs in one request; this server takes at most {limits.max_texts}",
        code="too_many_inputs",
        param="input",
    )


def _check_encodable(texts: list[str], single: bool) -> None:
    """Refuse a text UTF-8 cannot encode: a lone surrogate, what JavaScript's ``slice`` leaves
    of a cut emoji, and JSON's ``"\\ud83d"`` spells. One pass over all, the per-text one only
    to name the first."""
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        for i, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                where = "'input'" if single else f"input[{i}]"
                raise _bad(
                    f"{where} is not valid Unicode: character {exc.start} is a lone surrogate "
                    f"({text[exc.start]!a}), half of a character that was cut",
                    "input",
                    i,
                ) from None


def too_long(exc: TextTooLongError, model: str, *, single: bool) -> ProtocolError:
    """The 400 for an input longer than the model takes, naming both ways to truncate it."""
    where = "'input'" if single else f"input[{exc.index}]"
    if exc.tokens is not None and exc.limit is not None:
        what = (
            f"{where} is {exc.tokens} tokens long, more than the {exc.limit} that model "
            f"{model!r} takes"
        )
    else:
        what = f"{where} is longer than model {model!r} takes"
    return ProtocolError(
        400,
        f'{what}: send "truncate": true to embed its first tokens, or start the server '
        "with --truncate to do so for every request",
        code="context_length_exceeded",
        index=exc.index,
        param="input",
    )


def check_dimensions(dimensions: int, model_dimension: int) -> None:
    """Refuse OpenAI's ``dimensions`` beyond what the model's vectors have.

    Raises:
        ProtocolError: 400, more dimensions than the model's vectors have.
    """
    if dimensions > model_dimension:
        raise ProtocolError(
            400,
            f"dimensions {dimensions} is more than the model's {model_dimension}",
            code="invalid_value",
            param="dimensions",
        )


def shorten(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """OpenAI's ``dimensions``: the first ``dimensions`` components, scaled to unit length.

    Raises:
        ProtocolError: 400, more dimensions than the model's vectors have.
    """
    if dimensions is None:
        return vectors
    check_dimensions(dimensions, vectors.shape[1])
    head = np.array(vectors[:, :dimensions], dtype=np.float32)
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    np.divide(head, norms, out=head, where=norms > 0)
    return head


def response_body(vectors: np.ndarray, model: str, tokens: int, encoding: str) -> bytes:
    """The JSON answer to a ``/v1/embeddings`` request, ``data`` in input order.

    Written by hand: the vectors are most of it and need no escaping, so the body is joined
    from pieces rather than built as objects and serialized; the pieces of all the vectors
    are made by one call (`_base64_rows`, `_float_rows`), and the body by one join.
    """
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    usage = json.dumps({"prompt_tokens": tokens, "total_tokens": tokens}).encode()
    pieces: list[Any] = [
        b'{"object":"list","model":' + json.dumps(model).encode(),
        b',"usage":' + usage + b',"data":[',
    ]
    if encoding == "base64":  # a string needs quotes, which the pieces around it carry
        embeddings: list[Any] = _base64_rows(rows)
        opening, closing = b'"', b'"}'
    else:
        embeddings, opening, closing = _float_rows(rows), b"", b"}"
    for i, embedding in enumerate(embeddings):
        pieces += (_item_head(i), opening, embedding, closing)
    pieces.append(b"]}")
    return b"".join(pieces)


@functools.lru_cache(maxsize=8192)
def _item_head(index: int) -> bytes:
    """The start of ``data[index]``, with the comma before it (cached: the same few
    thousand heads start every answer)."""
    return b'%s{"object":"embedding","index":%d,"embedding":' % (b"," if index else b"", index)


def _base64_rows(rows: np.ndarray) -> list[memoryview]:
    """Each row's little-endian float32 bytes in base64, cut from one encoding of all: a
    row of a multiple of 3 bytes encodes on its own as it does among the others. A row of
    another length is padded with zero bytes to one, which encode as ``A`` where its own
    encoding has ``=``, and those are put back."""
    n, width = rows.shape[0], 4 * rows.shape[1]
    pad = -width % 3
    if pad:
        padded = np.zeros((n, width + pad), dtype=np.uint8)
        padded[:, :width] = rows.view(np.uint8).reshape(n, width)
        chars = np.frombuffer(bytearray(base64.b64encode(padded.data)), dtype=np.uint8)
        chars = chars.reshape(n, -1)
        chars[:, -pad:] = ord("=")
        encoded = chars.data.cast("B")
    else:
        encoded = memoryview(base64.b64encode(rows.data))
    step = (width + pad) // 3 * 4
    return [encoded[i * step : (i + 1) * step] for i in range(n)]


def _float_rows(rows: np.ndarray) -> list[bytes]:
    """Each row as a JSON list of numbers (each float32 as the shortest float64 repr that
    reads back to it, as ``json.dumps`` writes it), from one ``json.dumps`` of all."""
    if rows.shape[0] == 0:
        return []
    text = json.dumps(rows.tolist(), separators=(",", ":")).encode()
    # No number contains "],[": it is only ever the seam between two rows.
    return [b"[" + row + b"]" for row in text[2:-2].split(b"],[")]


def model_item(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "embeddingcache"}


def models_body(names: Sequence[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_item(name, created) for name in names]}


def error_body(exc: ProtocolError) -> dict[str, Any]:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = ERROR_TYPES.get(
        exc.status, "server_error" if exc.status >= 500 else "invalid_request_error"
    )
    return {
        "error": {
            "message": str(exc),
            "type": kind,
            "param": exc.param,
            "code": exc.code,
        }
    }
