"""Bad input gets a clear error naming the offending item, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from embeddingcache import EmbeddingCache, InvalidInputError, InvalidInputTypeError


@pytest.mark.parametrize(
    ("texts", "error", "message"),
    [
        (None, ValueError, r"texts is None"),
        ("", ValueError, r"text is empty or whitespace only"),
        ("  \n\t", ValueError, r"text is empty or whitespace only"),
        (["ok", ""], ValueError, r"texts\[1\] is empty or whitespace only"),
        (["ok", "fine", "   "], ValueError, r"texts\[2\] is empty or whitespace only"),
        (["ok", None], ValueError, r"texts\[1\] is None"),
        (["ok", 3], TypeError, r"texts\[1\] is of type int, not str"),
        (["ok", b"bytes"], TypeError, r"texts\[1\] is of type bytes, not str"),
        ([["nested"]], TypeError, r"texts\[0\] is of type list, not str"),
        (b"raw bytes", TypeError, r"texts must be a str or a sequence of str, not bytes"),
        (42, TypeError, r"texts must be a str or a sequence of str, not int"),
        (["ok", "lone \ud800 surrogate"], ValueError, r"texts\[1\] is not valid Unicode"),
    ],
)
def test_bad_texts_raise_naming_the_index_and_write_nothing(
    cache: EmbeddingCache, cache_dir: Path, texts: object, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        cache.get_embeddings(texts)  # type: ignore[arg-type]
    assert not cache_dir.exists()


def test_validation_errors_are_library_errors_too(cache: EmbeddingCache) -> None:
    with pytest.raises(InvalidInputError):
        cache.get_embeddings([""])
    with pytest.raises(InvalidInputTypeError):
        cache.get_embeddings([1])  # type: ignore[list-item]


def test_a_failed_call_loses_nothing_already_stored(cache: EmbeddingCache, cache_dir: Path) -> None:
    stored = cache.get_embeddings(["kept"])
    with pytest.raises(ValueError, match="texts"):
        cache.get_embeddings(["kept", None])  # type: ignore[list-item]
    assert (cache.get_embeddings(["kept"]) == stored).all()
    assert cache.stats["computed"] == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"normalize": "upper"}, r"unknown normalize policy 'upper'; choose one of strip, lower"),
        ({"dtype": "float16"}, r"unknown dtype 'float16'"),
        ({"batch_size": 0}, r"batch_size must be a positive int"),
        ({"prompt_name": "search"}, r"has no prompt 'search'; its prompts: document, query"),
    ],
)
def test_bad_options_are_refused_before_anything_happens(
    cache: EmbeddingCache, cache_dir: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cache.get_embeddings(["fine"], **options)  # type: ignore[arg-type]
    assert not cache_dir.exists()


def test_bad_constructor_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown fallback provider"):
        EmbeddingCache(cache_dir=tmp_path, fallback_providers=("local", "openai"))
    with pytest.raises(ValueError, match="unknown fallback provider"):
        EmbeddingCache(cache_dir=tmp_path, fallback_providers="local")
    with pytest.raises(ValueError, match="unknown normalize policy"):
        EmbeddingCache(cache_dir=tmp_path, normalize="nfkc")
    with pytest.raises(ValueError, match="model must be a non-empty str"):
        EmbeddingCache(cache_dir=tmp_path).get_embeddings("x", model="  ")
