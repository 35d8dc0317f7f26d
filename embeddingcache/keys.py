"""From a caller's text to the string the model encodes, its key, and a model's shard slug.

The key of a vector is the SHA-512 digest of the *embedded string*: the text after the
normalization policy, with the model's prompt in front. Two calls share a vector exactly when
they share that string and the model.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from .errors import InvalidInputError, InvalidInputTypeError
from .models import catalog_name

__all__ = [
    "NORMALIZATION_POLICIES",
    "NormalizePolicy",
    "check_model_name",
    "key_of",
    "keys_of",
    "model_slug",
    "normalize_text",
    "validate_texts",
]

NormalizePolicy = Literal["strip", "lower", "none"]

# "lower" lowercases first, then strips: lowercasing never adds outer whitespace, so the
# result is a fixed point of the policy (normalizing twice changes nothing).
_POLICIES: dict[str, Callable[[str], str]] = {
    "strip": str.strip,
    "lower": lambda text: text.lower().strip(),
    "none": lambda text: text,
}
NORMALIZATION_POLICIES: tuple[str, ...] = tuple(_POLICIES)


def normalizer(policy: str) -> Callable[[str], str]:
    """Return the function of a normalization policy, or raise ``InvalidInputError``."""
    try:
        return _POLICIES[policy]
    except (KeyError, TypeError):
        raise InvalidInputError(
            f"unknown normalize policy {policy!r}; "
            f"choose one of {', '.join(NORMALIZATION_POLICIES)}"
        ) from None


def normalize_text(text: str, policy: str = "strip") -> str:
    """Apply a normalization policy (``"strip"``, ``"lower"`` or ``"none"``) to one text."""
    return normalizer(policy)(text)


def validate_texts(texts: object, *, offset: int = 0) -> tuple[list[str], bool]:
    """Check the caller's input; return it as a list and whether it was a single ``str``.
    ``offset`` is added to the index an error names (a chunk of a longer input).

    Raises:
        InvalidInputError: ``None``, an empty or whitespace-only text, or a text that is not
            valid Unicode (a lone surrogate); the message names the index.
        InvalidInputTypeError: anything that is neither a ``str`` nor a sequence of ``str``.
    """
    if isinstance(texts, str):
        _check_one(texts, None)
        return [texts], True
    if texts is None:
        raise InvalidInputError("texts is None; pass a str or a sequence of str")
    if isinstance(texts, (bytes, bytearray, memoryview)) or not isinstance(texts, Iterable):
        raise InvalidInputTypeError(
            f"texts must be a str or a sequence of str, not {type(texts).__name__}"
        )
    items = list(texts)
    if not _all_valid(items):
        for index, text in enumerate(items, offset):
            _check_one(text, index)
    return items, False


def _all_valid(items: list[Any]) -> bool:
    """Whether every item passes `_check_one`, in a few passes of C code: the hit path
    validates every text, so this runs per call; the per-item check runs only on failure to
    name the first bad one."""
    if not set(map(type, items)) <= {str} or not all(items) or any(map(str.isspace, items)):
        return False
    try:
        "".join(items).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_one(text: object, index: int | None) -> None:
    where = "text" if index is None else f"texts[{index}]"
    if text is None:
        raise InvalidInputError(f"{where} is None; every text must be a non-empty str")
    if not isinstance(text, str):
        raise InvalidInputTypeError(f"{where} is of type {type(text).__name__}, not str")
    if not text.strip():
        raise InvalidInputError(f"{where} is empty or whitespace only")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{where} is not valid Unicode (character {exc.start} is a lone surrogate)"
        ) from None


def key_of(embedded: str) -> bytes:
    """The 64-byte SHA-512 digest of an embedded string's UTF-8 bytes."""
    return hashlib.sha512(embedded.encode("utf-8")).digest()


def keys_of(embedded: Sequence[str]) -> list[bytes]:
    """Keys of many embedded strings, in order."""
    sha512 = hashlib.sha512
    return [sha512(s.encode("utf-8")).digest() for s in embedded]


_UNSAFE = re.compile(r"[^a-z0-9._-]+")
_CLEAN = re.compile(r"[a-z0-9][a-z0-9._-]*")
SLUG_MAX = 80
# Names a shard file must not take: the text database, and names Windows refuses for files.
_RESERVED = frozenset(
    ["hashstring", "con", "prn", "aux", "nul"]
    + [f"{port}{n}" for port in ("com", "lpt") for n in range(1, 10)]
)


def check_model_name(model: object) -> str:
    """The model name, if a table can record it: a non-empty ``str`` without NUL (which
    Postgres text cannot hold) or lone surrogates (which have no UTF-8).

    Raises:
        InvalidInputError: any other name.
    """
    if not isinstance(model, str) or not model.strip():
        raise InvalidInputError(f"model must be a non-empty str, not {model!r}")
    if "\x00" in model:
        raise InvalidInputError(f"model name {model!r} contains a NUL character")
    try:
        model.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(f"model name {model!r} is not valid Unicode") from None
    return model


def model_slug(model: str) -> str:
    """A file-name-safe, bounded slug for a model name.

    A name that is already a safe lowercase file name is its own slug, so
    ``e5-small-v2`` stays readable, and so does a catalog name (``all-MiniLM-L6-v2`` is
    ``all-minilm-l6-v2``). Any other name is reduced to ``[a-z0-9._-]``, cut to
    a bounded length and given a suffix from a hash of the exact name, so names that differ
    only in case or punctuation (``Org/Model`` and ``org_model``) get different slugs. The
    slug never contains a path separator and never starts with a dot, so it cannot name a
    parent directory or a hidden file. Collisions are still caught by the shard's sanity table.
    """
    check_model_name(model)
    if catalog_name(model) == model:
        # Catalog names are known and distinct in lower case: readable file names.
        return model.lower()
    if (
        len(model) <= SLUG_MAX
        and _CLEAN.fullmatch(model)
        and ".." not in model
        and model.split(".")[0] not in _RESERVED
    ):
        return model
    readable = _UNSAFE.sub("-", model.lower()).strip("-.")
    readable = re.sub(r"\.{2,}", ".", readable)[: SLUG_MAX - 17].rstrip("-.") or "model"
    suffix = hashlib.sha256(model.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{readable}-{suffix}"
