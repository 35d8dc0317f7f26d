"""The public surface is embeddingcache.__all__, and it holds what the issues promise."""

from __future__ import annotations

import inspect
from typing import Any

import embeddingcache
from embeddingcache.options import CallOptions, SharedCallOptions

PROMISED = {
    "get_embeddings",
    "embed",
    "EmbeddingCache",
    "EmbeddingCacheError",
}


def test_all_names_the_promised_api_and_every_name_exists() -> None:
    assert set(embeddingcache.__all__) >= PROMISED
    for name in embeddingcache.__all__:
        assert hasattr(embeddingcache, name), name


def test_every_exported_error_derives_from_the_base() -> None:
    for name in embeddingcache.__all__:
        obj = getattr(embeddingcache, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, Warning):
            assert issubclass(obj, embeddingcache.EmbeddingCacheError), name


def test_get_embeddings_has_the_documented_signature() -> None:
    params = inspect.signature(embeddingcache.get_embeddings).parameters
    assert list(params)[:2] == ["texts", "model"]
    expected = {
        "cache_dir": None,
        "db_url": None,
        "normalize": "strip",
        "batch_size": 32,
        "show_progress": False,
        "normalize_embeddings": False,
        "dtype": "float32",
        "truncate": False,
    }
    for name, default in expected.items():
        assert params[name].default == default, name
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name


def test_the_cache_class_has_the_documented_signature() -> None:
    params = inspect.signature(embeddingcache.EmbeddingCache).parameters
    expected = {
        "cache_dir": None,
        "db_url": None,
        "remote_url": None,
        "fallback_providers": ("local", "remote"),
        "normalize": "strip",
        "timeout": 5.0,
        "batch_size": 32,
        "device": None,
        "max_size": None,
    }
    assert params["model"].default is None
    for name, default in expected.items():
        assert params[name].default == default, name
    for method in ("embed", "get_embeddings", "prune", "close", "__enter__", "__exit__"):
        assert callable(getattr(embeddingcache.EmbeddingCache, method))
    assert isinstance(inspect.getattr_static(embeddingcache.EmbeddingCache, "stats"), property)


def _options(function: object, *, skip: set[str]) -> dict[str, inspect.Parameter]:
    params = inspect.signature(function).parameters  # type: ignore[arg-type]
    return {name: p for name, p in params.items() if name not in skip}


def test_the_module_functions_take_the_options_of_the_methods() -> None:
    """An option added to a method and not to its module function (or the other way round)
    fails here; a method's ``None`` ("the cache's setting") is the cache's default there."""
    cache_defaults = inspect.signature(embeddingcache.EmbeddingCache).parameters
    for name in ("get_embeddings", "embed", "iter_embeddings"):
        function = _options(getattr(embeddingcache, name), skip={"cache_dir", "db_url"})
        method = _options(getattr(embeddingcache.EmbeddingCache, name), skip={"self"})
        assert list(function) == list(method), name
        for option, param in method.items():
            mine = function[option]
            assert mine.kind is param.kind, (name, option)
            if param.default is None and option in cache_defaults:
                assert mine.default == cache_defaults[option].default, (name, option)
            else:
                assert mine.default == param.default, (name, option)
    where = inspect.signature(embeddingcache.get_embeddings).parameters
    assert where["cache_dir"].kind is where["db_url"].kind is inspect.Parameter.KEYWORD_ONLY


def test_output_works_on_the_module_function(tmp_path: Any, tiny_model: str) -> None:
    listed = embeddingcache.get_embeddings(
        ["one", "two"], tiny_model, cache_dir=tmp_path, output="list"
    )
    assert isinstance(listed, list) and len(listed) == 2 and isinstance(listed[0][0], float)
    array = embeddingcache.get_embeddings(["one", "two"], tiny_model, cache_dir=tmp_path)
    assert array.tolist() == listed


def test_the_overloads_take_the_options_of_the_implementations() -> None:
    """The overloads of get_embeddings unpack a TypedDict: an option added to the
    implementation and not there would work, yet fail every caller's type check (mypy
    catches the other way round)."""
    typed = {
        embeddingcache.EmbeddingCache.get_embeddings: CallOptions,
        embeddingcache.get_embeddings: SharedCallOptions,
    }
    for function, options in typed.items():
        params = inspect.signature(function).parameters.values()
        keyword = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert keyword - {"output"} == options.__optional_keys__, function.__qualname__
