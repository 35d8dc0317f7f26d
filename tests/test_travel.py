"""A cache that travels (issue 29), in one process: it pickles as its configuration, with
credentials from the environment left there; every copy of one configuration in a process is
one cache; Dask hashes it deterministically; the adapters pickle too; `missing` says what a
job still has to send; `EmbedColumn` adds vectors to the batch formats of Ray and Dask.
The real clusters are in tests/test_clusters.py."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embeddingcache.cache as cache_module
from embeddingcache import EmbeddingCache, InvalidInputError, InvalidInputTypeError
from embeddingcache.integrations.batches import EmbedColumn, EmbedTexts

TEXTS = [f"a travelling text, number {i}" for i in range(40)]
PASSWORD = "s3cret-pw-9f2c"
KEY = "sk-travel-test-4e1d"


def _copy(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


def test_a_cache_pickles_before_and_after_use_and_its_copy_serves_the_same_vectors(
    any_cache: EmbeddingCache,
) -> None:
    """Pickled unused, then used, the copy opens the same store and serves the stored
    vectors: it computes nothing."""
    fresh = _copy(any_cache)
    vectors = any_cache.get_embeddings(TEXTS)
    used = _copy(any_cache)
    assert fresh is used  # one configuration, one cache in this process
    assert used is not any_cache
    assert np.array_equal(used.get_embeddings(TEXTS), vectors)
    assert used.stats["computed"] == 0 and used.stats["hits"] == len(TEXTS)


def test_a_pickled_cache_carries_no_lock_connection_or_model(any_cache: EmbeddingCache) -> None:
    """What crosses a process boundary is the configuration alone: small, and free of the
    objects a process cannot share."""
    any_cache.get_embeddings(TEXTS)
    payload = pickle.dumps(any_cache)
    assert len(payload) < 2_000
    for name in (b"RLock", b"Engine", b"SentenceTransformer", b"Thread", b"sqlite3"):
        assert name not in payload


def test_credentials_from_the_environment_stay_there_and_given_ones_travel(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database URL, token and API key read from the environment are pickled as references
    (their secrets nowhere in the bytes); the copy reads them where it lands. Given as
    arguments, they travel, since nothing else could give them to a worker."""
    from sqlalchemy import make_url

    url = make_url(pg_url).set(password=PASSWORD).render_as_string(hide_password=False)
    monkeypatch.setenv("EMBEDDING_CACHE_DB_URL", url)
    monkeypatch.setenv("EMBEDDING_CACHE_TOKEN", "token-" + PASSWORD)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cache = EmbeddingCache("openai:text-embedding-3-small", base_url="http://127.0.0.1:9/v1")
    payload = pickle.dumps(cache)
    assert PASSWORD.encode() not in payload and KEY.encode() not in payload
    assert PASSWORD not in repr(cache.config) and PASSWORD not in repr(cache)
    copy = pickle.loads(payload)
    assert copy.db_url == url and copy.token == "token-" + PASSWORD
    given = EmbeddingCache("openai:m", db_url=url, api_key=KEY, token="t-" + PASSWORD)
    for name in ("OPENAI_API_KEY", "EMBEDDING_CACHE_TOKEN", "EMBEDDING_CACHE_DB_URL"):
        monkeypatch.delenv(name)
    landed = _copy(given)
    assert landed.token == "t-" + PASSWORD and landed.config.api_key == KEY
    assert landed.db_url == url
    with_userinfo = EmbeddingCache("m", db_url=url, remote_url=f"http://u:{KEY}@127.0.0.1:9")
    assert KEY not in repr(with_userinfo.config) and "***" in repr(with_userinfo.config)
    with_userinfo.close()
    cache.close()
    given.close()


def test_a_store_from_the_environment_must_be_the_same_where_the_cache_lands(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose environment names no database, or another, refuses the cache with
    an error that names the variable and shows no password: it never writes elsewhere."""
    from sqlalchemy import make_url

    url = make_url(pg_url).set(password=PASSWORD).render_as_string(hide_password=False)
    monkeypatch.setenv("EMBEDDING_CACHE_DB_URL", url)
    payload = pickle.dumps(EmbeddingCache("m"))
    monkeypatch.delenv("EMBEDDING_CACHE_DB_URL")
    with pytest.raises(InvalidInputError, match=r"EMBEDDING_CACHE_DB_URL .*sets none") as error:
        pickle.loads(payload)
    assert PASSWORD not in str(error.value) and "***" in str(error.value)
    monkeypatch.setenv("EMBEDDING_CACHE_DB_URL", url.replace("/ec_test_", "/other_"))
    with pytest.raises(InvalidInputError, match="sets postgresql"):
        pickle.loads(payload)


def test_a_folder_cache_stays_on_its_folder_where_the_environment_names_a_database(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No database on the driver means none on the worker, whatever its environment says."""
    payload = pickle.dumps(EmbeddingCache("m", cache_dir=cache_dir))
    monkeypatch.setenv("EMBEDDING_CACHE_DB_URL", "postgresql://nobody@127.0.0.1:9/none")
    copy = pickle.loads(payload)
    assert copy.db_url is None and copy.cache_dir == cache_dir


def test_closing_a_copy_lets_the_next_one_open_anew(any_cache: EmbeddingCache) -> None:
    """Copies share one open cache until it is closed; the next copy opens its own."""
    vectors = any_cache.get_embeddings(TEXTS[:3])
    first = _copy(any_cache)
    first.close()
    second = _copy(any_cache)
    assert second is not first
    assert np.array_equal(second.get_embeddings(TEXTS[:3]), vectors)


def test_dask_hashes_a_cache_and_its_methods_deterministically(
    tiny_model: str, cache_dir: Path, tmp_path: Path
) -> None:
    """Equal configurations have one token, in any process; another store has another."""
    from dask.base import tokenize

    cache = EmbeddingCache(tiny_model, cache_dir=cache_dir)
    assert tokenize(cache) == tokenize(_copy(cache)) == tokenize(cache)
    assert tokenize(cache.get_embeddings) == tokenize(_copy(cache).get_embeddings)
    other = EmbeddingCache(tiny_model, cache_dir=tmp_path / "other")
    assert tokenize(other) != tokenize(cache)
    key = EmbeddingCache("openai:m", cache_dir=cache_dir, api_key=KEY)
    assert KEY not in repr(key.__dask_tokenize__())


@pytest.fixture
def adapters(tiny_model: str, cache_dir: Path) -> Iterator[dict[str, Any]]:
    from embeddingcache.integrations.langchain import CachedEmbeddings
    from embeddingcache.integrations.llama_index import CachedEmbedding
    from embeddingcache.integrations.sentence_transformers import CachedSentenceTransformer

    made = {
        "sentence-transformers": CachedSentenceTransformer(tiny_model, cache_dir=cache_dir),
        "langchain": CachedEmbeddings(tiny_model, cache_dir=cache_dir),
        "llama-index": CachedEmbedding(tiny_model, cache_dir=cache_dir),
        "column": EmbedColumn(EmbeddingCache(tiny_model, cache_dir=cache_dir)),
    }
    yield made
    for adapter in made.values():
        getattr(adapter, "close", adapter.cache.close)()


def _vectors(adapter: Any, texts: list[str]) -> np.ndarray:
    if hasattr(adapter, "encode"):
        return np.asarray(adapter.encode(texts))
    if hasattr(adapter, "embed_documents"):
        return np.asarray(adapter.embed_documents(texts), dtype=np.float32)
    if hasattr(adapter, "get_text_embedding_batch"):
        return np.asarray(adapter.get_text_embedding_batch(texts), dtype=np.float32)
    return np.asarray(adapter({"text": np.array(texts, dtype=object)})["embedding"])


@pytest.mark.parametrize("name", ["sentence-transformers", "langchain", "llama-index", "column"])
def test_each_adapter_pickles_before_and_after_use_and_its_copy_serves_the_same_vectors(
    adapters: dict[str, Any], name: str
) -> None:
    """The integrations travel as their cache does: the copy computes nothing."""
    adapter = adapters[name]
    unused = _copy(adapter)
    vectors = _vectors(adapter, TEXTS[:8])
    if name == "sentence-transformers":
        assert adapter.max_seq_length > 0  # loads the model, which must not travel
    used = _copy(adapter)
    for copy in (unused, used):
        assert np.array_equal(_vectors(copy, TEXTS[:8]), vectors)
    cache = used.cache if hasattr(used, "cache") else used._cache
    assert cache.stats["computed"] == 0


def test_missing_names_the_distinct_texts_the_store_lacks_in_first_order(
    any_cache: EmbeddingCache,
) -> None:
    """Stored texts, repeats and texts equal once normalized are left out; what remains is
    each missing text once, as given, where it first appears."""
    any_cache.get_embeddings(TEXTS[:10])
    asked = [TEXTS[12], TEXTS[3], f"  {TEXTS[12]} ", TEXTS[11], TEXTS[12], TEXTS[0]]
    assert any_cache.missing(asked) == [TEXTS[12], TEXTS[11]]
    assert any_cache.missing(TEXTS[:10]) == []
    assert any_cache.stats["computed"] == 10  # missing() computed nothing


def test_missing_takes_a_generator_in_chunks_and_names_a_bad_text_by_its_index(
    cache: EmbeddingCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corpus streams through in chunks; a text missing in two chunks is named once; an
    empty text is named by its index in the whole input."""
    monkeypatch.setattr(cache_module, "CHUNK_TEXTS", 4)
    cache.get_embeddings(TEXTS[:2])
    corpus = (text for text in TEXTS[:10] + TEXTS[5:12])
    assert cache.missing(corpus) == TEXTS[2:12]
    with pytest.raises(InvalidInputError, match=r"texts\[9\]"):
        cache.missing(iter([*TEXTS[:9], " "]))
    with pytest.raises(InvalidInputTypeError):
        cache.missing("one text")


def test_missing_follows_the_options_that_choose_the_vector(
    prompted_model: str, tmp_path: Path
) -> None:
    """A query prompt or another normalization is another key: missing until computed."""
    cache = EmbeddingCache(prompted_model, cache_dir=tmp_path)
    cache.get_embeddings(TEXTS[:3])
    assert cache.missing(TEXTS[:3]) == []
    assert cache.missing(TEXTS[:3], prompt_name="query") == TEXTS[:3]
    assert cache.missing(["A Travelling Text"], normalize="lower") == ["A Travelling Text"]
    cache.get_embeddings(TEXTS[:3], prompt_name="query", normalize_embeddings=True)
    assert cache.missing(TEXTS[:3], prompt_name="query", show_progress=True) == []
    cache.close()


def test_embed_column_adds_vectors_to_each_batch_format(cache: EmbeddingCache) -> None:
    """Numpy dicts, pandas and pyarrow get the same vectors, in row order, other columns
    kept; a batch without the column, or of another kind, is refused by name."""
    import pandas as pd
    import pyarrow as pa

    expected = cache.get_embeddings(TEXTS[:5])
    embed = EmbedColumn(cache, column="body", output_column="vec")
    as_dict = embed({"body": np.array(TEXTS[:5]), "id": np.arange(5)})
    assert np.array_equal(as_dict["vec"], expected) and list(as_dict["id"]) == list(range(5))
    frame = embed(pd.DataFrame({"body": TEXTS[:5], "id": range(5)}))
    assert np.array_equal(np.stack(frame["vec"].to_list()), expected)
    table = embed(pa.table({"body": TEXTS[:5], "vec": [0] * 5}))
    assert table.column_names == ["body", "vec"]
    assert np.array_equal(np.array(table.column("vec").to_pylist(), dtype=np.float32), expected)
    with pytest.raises(InvalidInputError, match="no column 'body'"):
        embed({"text": np.array(TEXTS[:2])})
    with pytest.raises(InvalidInputTypeError, match="not list"):
        embed(TEXTS[:2])
    with pytest.raises(InvalidInputError, match=r"texts\[1\]"):
        embed({"body": np.array(["fine", ""], dtype=object)})
    assert np.array_equal(EmbedTexts(cache)(iter(TEXTS[:5])), expected)


def test_a_ray_actor_given_a_gpu_computes_on_its_own() -> None:
    """Ray shows an actor only its GPUs: the driver's ``cuda:1`` is the actor's ``cuda``;
    without a GPU, or with another choice, the cache's device stands."""
    pytest.importorskip("ray")
    from embeddingcache.integrations.ray import actor_device

    assert actor_device("cuda:1", [1]) == "cuda"
    assert actor_device(None, [0]) is None  # finds the GPU itself
    assert actor_device("cpu", [0]) == "cpu"
    assert actor_device("cuda:1", []) == "cuda:1"
