"""The shared helpers: one finite check, warnings that point at the caller."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from embeddingcache import EmbeddingCache, EmbeddingCacheWarning
from embeddingcache._util import finite_rows, first_non_finite


def test_first_non_finite_names_the_first_row_with_nan_or_infinity() -> None:
    matrix = np.zeros((4, 3), dtype=np.float32)
    assert first_non_finite(matrix) is None
    matrix[2, 1] = np.inf
    matrix[3, 0] = np.nan
    assert first_non_finite(matrix) == 2
    assert finite_rows(matrix).tolist() == [True, True, False, False]
    assert first_non_finite(np.empty((0, 3), dtype=np.float32)) is None


def test_a_repair_warning_points_at_the_callers_line(cache_dir: Path, tiny_model: str) -> None:
    """A damaged SQLite file is moved aside deep inside storage; the warning names this file."""
    with EmbeddingCache(tiny_model, cache_dir=cache_dir) as cache:
        cache.get_embeddings(["a"])
    (cache_dir / "hashstring.db").write_bytes(b"not a database" * 100)
    for sidecar in ("hashstring.db-wal", "hashstring.db-shm"):
        (cache_dir / sidecar).unlink(missing_ok=True)
    with (
        warnings.catch_warnings(record=True) as caught,
        EmbeddingCache(tiny_model, cache_dir=cache_dir) as cache,
    ):
        warnings.simplefilter("always")
        cache.get_embeddings(["b"])
    repairs = [w for w in caught if issubclass(w.category, EmbeddingCacheWarning)]
    assert repairs, "the damaged file was not reported"
    assert all(w.filename == __file__ for w in repairs), [w.filename for w in repairs]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2", None])
def test_positive_int_refuses_what_is_not_a_count(bad: object) -> None:
    from embeddingcache import InvalidInputError
    from embeddingcache._util import positive_int

    with pytest.raises(InvalidInputError, match="batch_size must be a positive int"):
        positive_int(bad, "batch_size")
