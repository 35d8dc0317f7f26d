"""Models behind an API (``openai:MODEL``): named by their endpoint, computed once, stored as
the API returned them, never mixed across endpoints, versions or ``dimensions``.

The upstream is the project's own ``serve`` of the tiny model (a real uvicorn server on
127.0.0.1), reached through its OpenAI-compatible ``/v1/embeddings``; faults come from the
small ASGI app of tests/test_openai_client.py.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import test_openai_client
from conftest import RunningServer
from test_openai_client import DIM, KEY, Upstream, ok, vectors_for

from embeddingcache import EmbeddingCache, get_embeddings
from embeddingcache.engines import EngineSettings
from embeddingcache.errors import (
    InvalidInputError,
)
from embeddingcache.models import OPENAI_BASE_URL, Access, resolve_model

# The fault-injecting upstream of the client's tests, as a fixture of this module too.
upstream = test_openai_client.upstream
TEXTS = ["an API computes this", "and this", "then the cache serves them"]


# -- naming and identity ----------------------------------------------------------------------


def test_an_openai_name_is_the_api_engine_with_openais_endpoint_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    spec = resolve_model("openai:text-embedding-3-small")
    assert spec.engine == "openai" and spec.name == "openai:text-embedding-3-small"
    assert spec.options["model"] == "text-embedding-3-small"
    assert spec.options["endpoint"] == "https://api.openai.com/v1"
    assert spec.access is not None and spec.access.base_url == OPENAI_BASE_URL


def test_the_endpoint_and_dimensions_are_in_the_name_credentials_and_query_are_not() -> None:
    spec = resolve_model(
        "openai:nomic-embed-text",
        base_url="http://user:secret@127.0.0.1:11434/v1/?api-version=1#x",
        api_key=KEY,
        dimensions=64,
    )
    assert spec.name == "openai:nomic-embed-text;endpoint=http://127.0.0.1:11434/v1;dimensions=64"
    assert spec.options == {
        "model": "nomic-embed-text",
        "endpoint": "http://127.0.0.1:11434/v1",
        "dimensions": 64,
    }
    # How it is reached is kept for the requests, and shown nowhere.
    assert spec.access == Access("http://user:secret@127.0.0.1:11434/v1/?api-version=1#x", KEY)
    for shown in (repr(spec), repr(spec.access), str(spec)):
        assert KEY not in shown and "secret" not in shown and "api-version" not in shown
    # The name alone says the same identity.
    again = resolve_model(spec.name)
    assert again == spec and again.access == Access("http://127.0.0.1:11434/v1", None)


def test_the_base_url_comes_from_the_argument_then_the_environment_then_openai(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    from_env = resolve_model("openai:m")
    assert from_env.name == "openai:m;endpoint=http://127.0.0.1:9/v1"
    assert from_env.access == Access("http://127.0.0.1:9/v1", KEY)
    given = resolve_model("openai:m", base_url="https://api.openai.com/v1/", api_key="other")
    assert given.name == "openai:m" and given.access == Access(
        "https://api.openai.com/v1/", "other"
    )


@pytest.mark.parametrize(
    ("name", "options", "says"),
    [
        ("openai:", {}, "openai:MODEL"),
        ("openai:m;dimensions=x", {}, "openai:MODEL"),
        ("openai:m", {"base_url": "ftp://host/v1"}, "http"),
        ("openai:m;endpoint=http://a:1/v1", {"base_url": "http://b:2/v1"}, "is at"),
        ("openai:m;dimensions=8", {"dimensions": 16}, "dimensions=8"),
        ("openai:m", {"dimensions": 0}, "positive"),
    ],
)
def test_a_malformed_or_contradictory_api_model_is_refused_saying_why(
    name: str, options: dict[str, Any], says: str
) -> None:
    with pytest.raises(InvalidInputError, match=says):
        resolve_model(name, **options)


def test_engine_settings_never_show_the_key_or_the_token() -> None:
    settings = EngineSettings(token="tok-do-not-show", api_key=KEY)
    assert KEY not in repr(settings) and "tok-do-not-show" not in repr(settings)


# -- against the project's own serve ----------------------------------------------------------


def _upstream_vectors(url: str, model: str, texts: list[str]) -> np.ndarray:
    """What the upstream's /v1/embeddings answers, decoded from its base64."""
    answer = httpx.post(
        f"{url}/v1/embeddings",
        json={"model": model, "input": texts, "encoding_format": "base64"},
        timeout=60,
    )
    answer.raise_for_status()
    rows = [base64.b64decode(item["embedding"]) for item in answer.json()["data"]]
    return np.stack([np.frombuffer(row, dtype="<f4") for row in rows])


def _requests(url: str) -> int:
    counted: int = httpx.get(f"{url}/stats", timeout=10).json()["requests"]
    return counted


def _api_cache(folder: Path, base_url: str, **options: Any) -> EmbeddingCache:
    return EmbeddingCache(
        cache_dir=folder,
        remote_url=False,
        fallback_providers=("local",),
        base_url=base_url,
        api_key=options.pop("api_key", KEY),
        **options,
    )


def test_vectors_through_openai_are_bit_equal_to_the_upstreams_and_asked_once(
    start_server: Callable[..., tuple[RunningServer, Any]], tiny_model: str, tmp_path: Path
) -> None:
    server, _ = start_server()
    model = f"openai:{tiny_model}"
    with _api_cache(tmp_path / "cache", server.url + "/v1") as cache:
        got = cache.get_embeddings(TEXTS, model)
        assert got.dtype == np.float32 and got.shape == (3, 32)
        assert np.array_equal(got, _upstream_vectors(server.url, tiny_model, TEXTS))
        assert cache.stats["computed"] == 3
        before = _requests(server.url)
        again = cache.get_embeddings(TEXTS, model)
        assert np.array_equal(again, got) and _requests(server.url) == before
        assert cache.stats["hits"] == 3
    # Another process (a new cache) asks the probe once for the model's version, no text.
    with _api_cache(tmp_path / "cache", server.url + "/v1") as cache:
        before = _requests(server.url)
        assert np.array_equal(cache.get_embeddings(TEXTS, model), got)
        assert _requests(server.url) == before + 1 and cache.stats["computed"] == 0


def test_the_module_function_takes_base_url_and_api_key(
    start_server: Callable[..., tuple[RunningServer, Any]], tiny_model: str, tmp_path: Path
) -> None:
    server, _ = start_server()
    got = get_embeddings(
        TEXTS[:1], f"openai:{tiny_model}", base_url=server.url + "/v1", api_key=KEY
    )
    assert np.array_equal(got, _upstream_vectors(server.url, tiny_model, TEXTS[:1]))


def test_the_same_model_name_at_another_endpoint_gets_nothing_from_the_first_shard(
    start_server: Callable[..., tuple[RunningServer, Any]], tiny_model: str, tmp_path: Path
) -> None:
    first, _ = start_server()
    second, _ = start_server(storage={"cache_dir": tmp_path / "second-server"})
    model = f"openai:{tiny_model}"
    with _api_cache(tmp_path / "cache", first.url + "/v1") as cache:
        cache.get_embeddings(TEXTS, model)
    with _api_cache(tmp_path / "cache", second.url + "/v1") as cache:
        cache.get_embeddings(TEXTS, model)
        assert cache.stats == {**cache.stats, "hits": 0, "computed": 3}
        shards = sorted(s.model or "" for s in cache.contents().shards)
    assert shards == sorted(
        f"openai:{tiny_model};endpoint={server.url}/v1" for server in (first, second)
    )


def test_dimensions_is_asked_of_the_api_and_has_a_shard_of_its_own(
    upstream: tuple[Upstream, str], tmp_path: Path
) -> None:
    app, url = upstream

    def shortened(body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        status, headers, answer = ok(body)
        for item in answer["data"]:
            raw = base64.b64decode(item["embedding"])[: 4 * body["dimensions"]]
            item["embedding"] = base64.b64encode(raw).decode()
        return status, headers, answer

    with _api_cache(tmp_path / "cache", url) as cache:
        full = cache.get_embeddings(TEXTS, "openai:m")
        app.script.extend([shortened, shortened])  # the probe, then the texts
        short = cache.get_embeddings(TEXTS, "openai:m", dimensions=4)
        assert full.shape == (3, DIM) and short.shape == (3, 4)
        assert app.requests[-1][0]["dimensions"] == 4
        assert np.array_equal(short, vectors_for(TEXTS)[:, :4])
        shards = sorted(s.model or "" for s in cache.contents().shards)
    assert shards == [f"openai:m;endpoint={url}", f"openai:m;endpoint={url};dimensions=4"]
