"""Keys and tokens: what one may be, and keeping them out of every message.

A key travels in an HTTP header (``Authorization: Bearer KEY``), which carries visible ASCII
and spaces only. A key read from a file (``open(f).read()``) ends with a newline; one pasted
from a document may hold a non-breaking space or a curly quote. So `clean` strips the outer
whitespace of every key and token, on every path, and refuses anything else a header cannot
carry, before any request, as one `InvalidInputError` that names the problem and never the
key (issue 30: httpx's "Illegal header value" and a bare ``UnicodeEncodeError`` both quoted
it, and the first was retried).

Messages that quote a foreign library's words or a URL as given go through `mask`: the
secrets it is handed and the ``user:password@`` and query of every URL become ``***``;
`clean_cause` keeps a foreign exception as a ``__cause__`` only when no secret is in it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import InvalidInputError, InvalidInputTypeError

__all__ = ["clean", "clean_cause", "mask"]

MASK = "***"
# A shorter secret is not looked for in messages: it would mask ordinary words.
MIN_MASKED = 4
# What an HTTP header cannot carry: anything but visible ASCII and the space.
_UNSENDABLE = re.compile(r"[^ -~]")
# Userinfo ends at the first '@' before the path; a query runs to a quote, space or fragment.
_USERINFO = re.compile(r"(?<=://)[^/?#@\s'\"]*@")
_QUERY = re.compile(r"(://[^?\s'\"]*)\?[^#\s'\"]*")


def clean(value: str | None, what: str) -> str | None:
    """A key or token as it is sent: without outer whitespace (``""`` stays: no key).

    Raises:
        InvalidInputError: a character an HTTP header cannot carry remains (a control
            character or a non-ASCII one); the message says which kind and where, never
            the key.
        InvalidInputTypeError: not a ``str``.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInputTypeError(f"{what} must be a str, not {type(value).__name__}")
    value = value.strip()
    found = _UNSENDABLE.search(value)
    if found is not None:
        kind = "a control character" if found[0].isascii() else "a non-ASCII character"
        raise InvalidInputError(
            f"{what} holds {kind} at position {found.start()} (of {len(value)}), which an "
            "HTTP header cannot carry: check how the key was read or pasted (it is not "
            "shown here)"
        )
    return value


def mask(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with each of ``secrets`` (of `MIN_MASKED` characters or more), and the
    userinfo and query of every URL in it, replaced by ``***``."""
    for secret in secrets:
        if secret and len(secret) >= MIN_MASKED:
            text = text.replace(secret, MASK)
    text = _USERINFO.sub(MASK + "@", text)
    return _QUERY.sub(r"\1?" + MASK, text)


def clean_cause(exc: BaseException, secrets: Iterable[str | None] = ()) -> BaseException | None:
    """``exc`` when neither it nor an exception it chains to shows a secret or a URL's
    userinfo or query in its message, ``args`` or ``repr``; else ``None``: the translated
    error then keeps no cause (its own message says what happened)."""
    secrets = [s for s in secrets if s and len(s) >= MIN_MASKED]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for shown in (str(current), repr(current), *map(str, current.args)):
            if mask(shown, secrets) != shown:
                return None
        current = current.__cause__ or current.__context__
    return exc
