"""Small helpers that several modules share: one of each.

- `finite_rows`, `first_non_finite`: the one check that vectors hold no NaN or infinity.
- `warn`: a warning that points at the caller's first line outside this package, however
  deep inside the package it was raised.
- `positive_int`: the one check of a count option; `positive_env`, of a number in the
  environment.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np

from .errors import EmbeddingCacheWarning, InvalidInputError

__all__ = ["finite_rows", "first_non_finite", "positive_env", "positive_int", "warn"]

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
# migrations/ ships as embeddingcache.migrations from another folder of the repository.
_MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")


def finite_rows(matrix: np.ndarray) -> np.ndarray:
    """Per row of a 2-d matrix, whether it holds only finite numbers (one vectorized pass:
    this runs on every batch that is stored or received)."""
    rows: np.ndarray = np.isfinite(matrix).reshape(matrix.shape[0], -1).all(axis=1)
    return rows


def first_non_finite(matrix: np.ndarray) -> int | None:
    """The index of the first row holding NaN or an infinity, or ``None`` when all are
    finite."""
    if matrix.size == 0:
        return None
    finite = finite_rows(matrix)
    if finite.all():
        return None
    return int(np.flatnonzero(~finite)[0])


def _inside_package(filename: str) -> bool:
    return filename.startswith((_PACKAGE_DIR, _MIGRATIONS_DIR))


_local = threading.local()
N = TypeVar("N", int, float)
Deferred = list[tuple[str, type[Warning]]]


@contextmanager
def deferred_warnings() -> Iterator[Deferred]:
    """Collect what `warn` would issue on this thread (a worker's, such as the pipeline's
    writer), so that the caller's thread issues them, attributed to the caller's line."""
    saved = getattr(_local, "deferred", None)
    found: Deferred = []
    _local.deferred = found
    try:
        yield found
    finally:
        _local.deferred = saved


def warn(message: str, category: type[Warning] = EmbeddingCacheWarning) -> None:
    """Issue a warning attributed to the caller's line: the frame just outside the
    outermost call into embeddingcache, whether the warning is raised one call deep or
    five, and through libraries the package calls (tenacity) on the way. Inside
    `deferred_warnings` it is collected instead."""
    deferred = getattr(_local, "deferred", None)
    if deferred is not None:
        deferred.append((message, category))
        return
    level, outermost = 2, 2  # 1 is this function, 2 its caller
    frame = sys._getframe(1)
    while frame is not None:
        if _inside_package(frame.f_code.co_filename):
            outermost = level + 1
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=outermost)


def positive_int(value: object, name: str) -> int:
    """``value`` when it is an ``int`` of at least 1 (not a ``bool``).

    Raises:
        InvalidInputError: it is not.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive int, not {value!r}")
    return value


def positive_env(name: str, default: N, parse: Callable[[str], N]) -> N:
    """The positive number the environment variable ``name`` holds (``parse``: ``int`` or
    ``float``), ``default`` when it is unset or blank.

    Raises:
        InvalidInputError: it holds anything else.
    """
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        number = parse(value)
    except ValueError:
        number = parse("0")
    if not 0 < number < float("inf"):
        kind = "integer" if parse is int else "number"
        raise InvalidInputError(f"{name} must be a positive {kind}, not {value!r}")
    return number
