"""The read-through path end to end, on a real tiny model and real SQLite files."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import EncodeSpy

import embeddingcache
from embeddingcache import EmbeddingCache
from embeddingcache.keys import model_slug
from embeddingcache.models import ModelSpec


@pytest.fixture
def cache(any_cache: EmbeddingCache) -> EmbeddingCache:
    """Tests here run on SQLite and on Postgres, unless they read SQLite files themselves."""
    return any_cache


TEXTS = ["the cat sat", "on the mat", "a dog barked", "twice, at noon!"]


def shard_file(cache_dir: Path, model: str) -> Path:
    return cache_dir / f"{model_slug(model)}.db"


def test_second_call_computes_nothing(cache: EmbeddingCache, encode_spy: EncodeSpy) -> None:
    first = cache.get_embeddings(TEXTS)
    assert sorted(encode_spy.texts) == sorted(TEXTS)
    encode_spy.calls.clear()
    second = cache.get_embeddings(TEXTS)
    assert encode_spy.calls == []
    np.testing.assert_array_equal(first, second)
    assert cache.stats == {
        "hits": 4,
        "misses": 4,
        "remote_hits": 0,
        "computed": 4,
        "remote_computed": 0,
        "waited": 0,
        "pushed": 0,
        "not_stored": 0,
        "tokens_computed": 0,  # a local model's tokens are not counted
        "tokens_saved": 0,
    }


def test_a_fresh_cache_on_the_same_directory_computes_nothing(
    tiny_model: str, cache_dir: Path, encode_spy: EncodeSpy
) -> None:
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as first:
        expected = first.get_embeddings(TEXTS)
    encode_spy.calls.clear()
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as second:
        np.testing.assert_array_equal(second.get_embeddings(TEXTS), expected)
    assert encode_spy.calls == []


def test_vectors_equal_a_direct_encode(cache: EmbeddingCache, direct_model: Any) -> None:
    expected = direct_model.encode(TEXTS)
    np.testing.assert_allclose(cache.get_embeddings(TEXTS), expected, atol=1e-5)
    np.testing.assert_allclose(cache.get_embeddings(TEXTS), expected, atol=1e-5)  # from storage


def test_output_follows_input_order_whatever_is_cached(cache: EmbeddingCache) -> None:
    reference = cache.get_embeddings(TEXTS)
    permutation = [2, 0, 3, 1]
    permuted = cache.get_embeddings([TEXTS[i] for i in permutation] + ["a new text"])
    np.testing.assert_array_equal(permuted[:4], reference[permutation])


def test_duplicates_in_one_call_are_computed_and_counted_once(
    cache: EmbeddingCache, encode_spy: EncodeSpy
) -> None:
    vectors = cache.get_embeddings(["dup", "other", "dup", " dup ", "dup"])
    assert sorted(encode_spy.texts) == ["dup", "other"]
    assert cache.stats["misses"] == 2
    assert cache.stats["computed"] == 2
    for row in (2, 3, 4):
        np.testing.assert_array_equal(vectors[row], vectors[0])


def test_a_str_gives_one_vector_and_a_list_a_matrix(cache: EmbeddingCache) -> None:
    single = cache.get_embeddings("just one")
    batch = cache.get_embeddings(["just one"])
    assert single.shape == (32,)
    assert batch.shape == (1, 32)
    assert single.dtype == np.float32
    np.testing.assert_array_equal(single, batch[0])


def test_an_empty_list_gives_an_empty_matrix_of_the_known_dimension(cache: EmbeddingCache) -> None:
    cache.get_embeddings(["warm"])
    assert cache.get_embeddings([]).shape == (0, 32)


def test_read_time_options_do_not_change_what_is_stored(
    file_cache: EmbeddingCache, cache_dir: Path, tiny_model: str
) -> None:
    raw = file_cache.get_embeddings(TEXTS)
    unit = file_cache.get_embeddings(TEXTS, normalize_embeddings=True)
    doubles = file_cache.get_embeddings(TEXTS, dtype="float64")
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-6)
    assert doubles.dtype == np.float64
    np.testing.assert_array_equal(doubles, raw.astype(np.float64))
    with sqlite3.connect(shard_file(cache_dir, tiny_model)) as db:
        blobs = [row[0] for row in db.execute("SELECT vector FROM embedding")]
    assert len(blobs) == len(TEXTS)
    stored = {np.frombuffer(blob, "<f4").tobytes() for blob in blobs}
    assert stored == {row.astype("<f4").tobytes() for row in raw}


def test_embed_returns_python_lists(cache: EmbeddingCache) -> None:
    one = cache.embed("hello")
    many = cache.embed(["hello", "world"])
    assert isinstance(one, list) and isinstance(one[0], float) and len(one) == 32
    assert isinstance(many, list) and len(many) == 2 and many[0] == one


def test_the_hashstring_table_holds_the_embedded_string_of_every_key(
    file_cache: EmbeddingCache, cache_dir: Path, tiny_model: str
) -> None:
    file_cache.get_embeddings(["  padded text  ", "plain"])
    with sqlite3.connect(cache_dir / "hashstring.db") as db:
        rows = db.execute("SELECT hashid, text FROM hashstring").fetchall()
    assert sorted(text for _, text in rows) == ["padded text", "plain"]
    for hashid, text in rows:
        assert hashid == hashlib.sha512(text.encode("utf-8")).digest()
    with sqlite3.connect(shard_file(cache_dir, tiny_model)) as db:
        keys = {row[0] for row in db.execute("SELECT hashid FROM embedding")}
        lengths = {row[0] for row in db.execute("SELECT length(vector) FROM embedding")}
    assert keys == {hashid for hashid, _ in rows}
    assert lengths == {4 * 32}


def test_a_text_with_nul_characters_is_cached_on_every_backend(
    cache: EmbeddingCache, direct_model: Any, encode_spy: EncodeSpy
) -> None:
    texts = ["before\x00after", "\x00"]
    first = cache.get_embeddings(texts)
    second = cache.get_embeddings(texts)
    assert len(encode_spy.texts) == 2 and cache.stats["hits"] == 2
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, direct_model.encode(texts), atol=1e-5)


def test_the_sanity_table_names_the_model(
    file_cache: EmbeddingCache, cache_dir: Path, tiny_model: str
) -> None:
    file_cache.get_embeddings(["x"])
    with sqlite3.connect(shard_file(cache_dir, tiny_model)) as db:
        row = db.execute(
            "SELECT model, dimension, dtype, library_version FROM model_info"
        ).fetchall()
    assert row == [(tiny_model, 32, "float32", embeddingcache.__version__)]


@pytest.mark.parametrize(
    ("policy", "texts", "shared"),
    [
        ("strip", ["Hello", "  Hello\n"], True),
        ("strip", ["Hello", "hello"], False),
        ("lower", ["Hello", " hello "], True),
        ("none", ["Hello", " Hello"], False),
    ],
)
def test_normalization_policies_decide_which_texts_share_a_vector(
    cache: EmbeddingCache, encode_spy: EncodeSpy, policy: str, texts: list[str], shared: bool
) -> None:
    cache.get_embeddings(texts, normalize=policy)
    assert len(encode_spy.texts) == (1 if shared else 2)


def test_the_lower_policy_sends_the_lowercased_text_to_the_model(
    cache: EmbeddingCache, encode_spy: EncodeSpy, direct_model: Any
) -> None:
    vector = cache.get_embeddings("  Mixed Case ", normalize="lower")
    assert encode_spy.texts == ["mixed case"]
    np.testing.assert_allclose(vector, direct_model.encode("mixed case"), atol=1e-5)


def test_a_prompt_is_part_of_the_key_and_of_what_the_model_reads(
    file_cache: EmbeddingCache,
    tiny_model: str,
    cache_dir: Path,
    direct_model: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = ModelSpec(
        name=tiny_model,
        prompts={"document": "doc: ", "query": "query: "},
        default_prompt="document",
    )
    monkeypatch.setattr("embeddingcache.cache.resolve_model", lambda name, **api: spec)
    document = file_cache.get_embeddings("what is up")
    query = file_cache.get_embeddings("what is up", prompt_name="query")
    np.testing.assert_allclose(document, direct_model.encode("doc: what is up"), atol=1e-5)
    np.testing.assert_allclose(query, direct_model.encode("query: what is up"), atol=1e-5)
    with sqlite3.connect(cache_dir / "hashstring.db") as db:
        texts = sorted(row[0] for row in db.execute("SELECT text FROM hashstring"))
    assert texts == ["doc: what is up", "query: what is up"]
    with pytest.raises(ValueError, match="no prompt 'passage'"):
        file_cache.get_embeddings("x", prompt_name="passage")


def test_module_functions_share_one_cache_per_configuration(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encode_spy: EncodeSpy
) -> None:
    monkeypatch.setenv("EMBEDDING_CACHE_MODEL", tiny_model)
    first = embeddingcache.get_embeddings(["module level"])
    second = embeddingcache.embed("module level")
    assert len(encode_spy.texts) == 1
    np.testing.assert_array_equal(first[0], np.asarray(second, dtype=np.float32))
    assert (tmp_path / "default-cache" / "hashstring.db").exists()
    other_dir = tmp_path / "elsewhere"
    embeddingcache.get_embeddings(["module level"], tiny_model, cache_dir=other_dir)
    assert len(encode_spy.texts) == 2  # another directory is another cache
    assert (other_dir / "hashstring.db").exists()
    assert len(embeddingcache._caches) == 2


def test_arguments_win_over_the_environment(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBEDDING_CACHE_MODEL", "not-a-model-anyone-has")
    monkeypatch.setenv("EMBEDDING_CACHE_DIR", str(tmp_path / "from-env"))
    with EmbeddingCache(tiny_model, cache_dir=tmp_path / "from-arg", device="cpu") as c:
        assert c.model == tiny_model
        c.get_embeddings(["a"])
    assert (tmp_path / "from-arg" / "hashstring.db").exists()
    assert not (tmp_path / "from-env").exists()
    with EmbeddingCache() as from_env:
        assert from_env.model == "not-a-model-anyone-has"
        assert from_env.cache_dir == tmp_path / "from-env"


def test_the_default_model_is_nomic_embed_text_v2() -> None:
    with EmbeddingCache() as c:
        assert c.model == "nomic-embed-text-v2"


def test_a_text_longer_than_the_model_accepts_is_refused_unless_truncated(
    file_cache: EmbeddingCache, cache_dir: Path, direct_model: Any
) -> None:
    long_text = "x" * 100  # 102 tokens with [CLS] and [SEP]; the model takes 64
    with pytest.raises(ValueError, match=r"texts\[1\]: text is 102 tokens long.*64"):
        file_cache.get_embeddings(["short", long_text])
    assert not (cache_dir / "hashstring.db").exists()  # the short one was not stored either
    vector = file_cache.get_embeddings(long_text, truncate=True)
    np.testing.assert_allclose(vector, direct_model.encode(long_text), atol=1e-5)


def test_a_text_at_the_limit_is_accepted(cache: EmbeddingCache) -> None:
    assert cache.get_embeddings("y" * 62).shape == (32,)  # 62 + [CLS] + [SEP] = 64


def test_many_texts_span_several_read_chunks_and_write_batches(
    cache: EmbeddingCache, monkeypatch: pytest.MonkeyPatch, direct_model: Any
) -> None:
    monkeypatch.setattr("embeddingcache.storage.tables.READ_CHUNK", 7)
    monkeypatch.setattr("embeddingcache.storage.tables.WRITE_BATCH", 5)
    texts = [f"text {i}" for i in range(23)]
    cold = cache.get_embeddings(texts[:11])
    warm = cache.get_embeddings(texts)
    np.testing.assert_array_equal(warm[:11], cold)
    np.testing.assert_allclose(warm, direct_model.encode(texts), atol=1e-5)
    assert cache.stats["hits"] == 11 and cache.stats["computed"] == 23


def test_one_cache_serves_several_models_in_separate_shards(
    file_cache: EmbeddingCache, tiny_model: str, tmp_path: Path, cache_dir: Path
) -> None:
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(tiny_model, twin)
    a = file_cache.get_embeddings(["same text"])
    b = file_cache.get_embeddings(["same text"], str(twin))
    np.testing.assert_array_equal(a, b)  # same weights, but computed and stored per model
    assert file_cache.stats["computed"] == 2
    assert shard_file(cache_dir, tiny_model).exists()
    assert shard_file(cache_dir, str(twin)).exists()


def test_the_async_methods_give_what_the_sync_ones_do(file_cache: EmbeddingCache) -> None:
    import asyncio

    texts = ["async one", "async two", "async three"]

    async def many() -> tuple[Any, ...]:
        return await asyncio.gather(
            file_cache.aget_embeddings(texts),
            file_cache.aget_embeddings(texts[:1], normalize_embeddings=True),
            file_cache.aembed("async one"),
        )

    matrix, unit, listed = asyncio.run(many())
    np.testing.assert_array_equal(matrix, file_cache.get_embeddings(texts))
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    assert listed == file_cache.embed("async one")


def test_output_types_are_numpy_lists_or_torch_in_either_float_width(
    file_cache: EmbeddingCache,
) -> None:
    import torch

    texts = ["output one", "output two"]
    matrix = file_cache.get_embeddings(texts)
    assert file_cache.get_embeddings(texts, output="list") == matrix.tolist()
    assert file_cache.get_embeddings(texts[0], output="list") == matrix[0].tolist()
    tensor = file_cache.get_embeddings(texts, output="torch")
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    np.testing.assert_array_equal(tensor.numpy(), matrix)
    wide = file_cache.get_embeddings(texts, output="torch", dtype="float64")
    assert wide.dtype == torch.float64 and wide.shape == (2, 32)
    with pytest.raises(ValueError, match=r"embed\(\) always returns lists"):
        file_cache.embed(texts, output="numpy")
    with pytest.raises(ValueError, match="unknown output 'pandas'"):
        file_cache.get_embeddings(texts, output="pandas")  # type: ignore[call-overload]


def test_dimensions_keep_the_first_ones_and_normalization_follows(
    file_cache: EmbeddingCache,
) -> None:
    texts = ["matryoshka one", "matryoshka two"]
    full = file_cache.get_embeddings(texts)
    short = file_cache.get_embeddings(texts, dimensions=8)
    np.testing.assert_array_equal(short, full[:, :8])
    unit = file_cache.get_embeddings(texts, dimensions=8, normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(file_cache.get_embeddings(texts), full)  # stored as it was
    with pytest.raises(ValueError, match=r"dimensions=64, but model .* gives 32-d vectors"):
        file_cache.get_embeddings(texts, dimensions=64)
