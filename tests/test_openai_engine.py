"""Models behind an API (``openai:MODEL``): named by their endpoint, computed once, stored as
the API returned them, never mixed across endpoints, versions or ``dimensions``.

The upstream is the project's own ``serve`` of the tiny model (a real uvicorn server on
127.0.0.1), reached through its OpenAI-compatible ``/v1/embeddings``; faults come from the
small ASGI app of tests/test_openai_client.py.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import test_openai_client
from conftest import RunningServer
from test_openai_client import DIM, KEY, Upstream, _bad, ok, vectors_for

from embeddingcache import EmbeddingCache, get_embeddings, openai_client
from embeddingcache.engines import EngineSettings
from embeddingcache.errors import (
    AllProvidersFailedError,
    DimensionMismatchError,
    InvalidInputError,
    TextTooLongError,
)
from embeddingcache.keys import keys_of
from embeddingcache.models import OPENAI_BASE_URL, Access, resolve_model

# The fault-injecting upstream of the client's tests, as a fixture of this module too.
upstream = test_openai_client.upstream
Answer = Callable[[dict[str, Any]], tuple[int, dict[str, str], Any]]
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


def test_the_endpoint_and_dimensions_are_in_the_name_the_key_and_query_are_not() -> None:
    spec = resolve_model(
        "openai:nomic-embed-text",
        base_url="http://127.0.0.1:11434/v1/?api-version=secret#x",
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
    assert spec.access == Access("http://127.0.0.1:11434/v1/?api-version=secret#x", KEY)
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


def test_a_malformed_base_url_is_refused_without_the_credentials_it_carries(
    tmp_path: Path,
) -> None:
    url = f"ftp://user:{KEY}@example.com/v1?api-key={KEY}"
    with pytest.raises(InvalidInputError, match="http\\(s\\) URL") as refused:
        EmbeddingCache("openai:m", cache_dir=tmp_path, base_url=url)
    assert KEY not in str(refused.value) and "example.com/v1" in str(refused.value)
    assert KEY not in repr(EngineSettings(base_url=f"https://user:{KEY}@example.com/v1"))


# -- against the project's own serve ----------------------------------------------------------


def _upstream_vectors(url: str, model: str, texts: list[str], **asked: Any) -> np.ndarray:
    """What the upstream's /v1/embeddings answers, decoded from its base64."""
    answer = httpx.post(
        f"{url}/v1/embeddings",
        json={"model": model, "input": texts, "encoding_format": "base64", **asked},
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
        # OpenAI's dimensions, asked of the upstream, answered as it answers them.
        short = cache.get_embeddings(TEXTS, model, dimensions=16)
        assert np.array_equal(
            short, _upstream_vectors(server.url, tiny_model, TEXTS, dimensions=16)
        )
        assert cache.dimension(model) == 32


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


def test_a_model_changed_under_its_name_gets_a_new_shard_and_no_stale_vector(
    start_server: Callable[..., tuple[RunningServer, Any]], tiny_model: str, tmp_path: Path
) -> None:
    """The upstream's model is fine-tuned in place (same name, same endpoint): the next
    process's probe tells, and every text is computed anew in the new version's shard."""
    from test_model_versions import fine_tune

    folder = tmp_path / "served-model"
    shutil.copytree(tiny_model, folder)
    server, _ = start_server(models=[str(folder)])
    model, url = f"openai:{folder}", server.url + "/v1"
    with _api_cache(tmp_path / "cache", url) as cache:
        before = cache.get_embeddings(TEXTS, model)
    fine_tune(folder, seed=7)
    after_upstream = _upstream_vectors(server.url, str(folder), TEXTS)
    assert not np.allclose(after_upstream, before, atol=1e-3)
    with _api_cache(tmp_path / "cache", url) as cache:
        after = cache.get_embeddings(TEXTS, model)
        assert cache.stats["computed"] == 3 and cache.stats["hits"] == 0
        shards = sorted(s.model or "" for s in cache.contents().shards)
    assert np.array_equal(after, after_upstream)
    name = f"openai:{folder};endpoint={url}"
    assert len(shards) == 2 and shards[0] == name and shards[1].startswith(name + "@")


def test_a_serve_restarted_with_another_model_under_the_name_gets_a_new_shard(
    serve_process: Callable[..., Any], tiny_model: str, tmp_path: Path
) -> None:
    """The upstream is stopped and started again at the same port with new weights for the
    same model name, as an Ollama or vLLM is when its model is replaced."""
    from test_model_versions import fine_tune

    folder = tmp_path / "served-model"
    shutil.copytree(tiny_model, folder)
    serving = ("--model", str(folder), "--cache-dir", str(tmp_path / "server"), "--device", "cpu")
    server = serve_process(*serving)
    model, url = f"openai:{folder}", server.url + "/v1"
    with _api_cache(tmp_path / "cache", url) as cache:
        before = cache.get_embeddings(TEXTS, model)
    server.stop()
    fine_tune(folder, seed=11)
    port = server.url.rsplit(":", 1)[1]
    restarted = serve_process(*serving, "--port", port)
    assert restarted.url == server.url
    with _api_cache(tmp_path / "cache", url) as cache:
        after = cache.get_embeddings(TEXTS, model)
        assert cache.stats["computed"] == 3
    assert np.array_equal(after, _upstream_vectors(restarted.url, str(folder), TEXTS))
    assert not np.allclose(after, before, atol=1e-3)


@pytest.mark.usefixtures("storage")
def test_an_api_model_is_cached_alike_on_sqlite_and_postgres(
    start_server: Callable[..., tuple[RunningServer, Any]],
    tiny_model: str,
    storage: dict[str, Any],
) -> None:
    server, _ = start_server()
    model = f"openai:{tiny_model}"
    options = {"remote_url": False, "fallback_providers": ("local",), **storage}
    with EmbeddingCache(base_url=server.url + "/v1", api_key=KEY, **options) as cache:
        got = cache.get_embeddings(TEXTS, model)
        before = _requests(server.url)
        assert np.array_equal(cache.get_embeddings(TEXTS, model), got)
        assert _requests(server.url) == before and cache.stats["hits"] == 3
    assert np.array_equal(got, _upstream_vectors(server.url, tiny_model, TEXTS))


def test_a_hit_does_not_wait_on_an_api_that_cannot_answer(
    upstream: tuple[Upstream, str], tmp_path: Path
) -> None:
    """The version probe of a new process: one attempt on the read path, then none for a
    while; the stored vectors are served meanwhile."""
    app, url = upstream
    with _api_cache(tmp_path / "cache", url) as cache:
        cache.get_embeddings(TEXTS, "openai:m")
    app.script.extend([_status(503)] * 20)
    with _api_cache(tmp_path / "cache", url) as cache:
        sent = len(app.requests)
        assert np.array_equal(cache.get_embeddings(TEXTS, "openai:m"), vectors_for(TEXTS))
        assert len(app.requests) == sent + 1
        assert np.array_equal(cache.get_embeddings(TEXTS, "openai:m"), vectors_for(TEXTS))
        assert len(app.requests) == sent + 1 and cache.stats["hits"] == 6


def test_a_hit_waits_on_a_hanging_api_no_longer_than_the_probe_timeout(
    upstream: tuple[Upstream, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An API that accepts the probe and never answers (the client's own timeout is a
    minute): the read path gives up on it after `PROBE_TIMEOUT_S` and serves the hits."""
    from embeddingcache.pipeline import versioning

    app, url = upstream
    with _api_cache(tmp_path / "cache", url) as cache:
        cache.get_embeddings(TEXTS, "openai:m")
    monkeypatch.setattr(versioning, "PROBE_TIMEOUT_S", 0.2)
    app.delay = 3.0  # longer than the probe waits, far shorter than the client would
    with _api_cache(tmp_path / "cache", url) as cache, caplog.at_level(logging.WARNING):
        assert np.array_equal(cache.get_embeddings(TEXTS, "openai:m"), vectors_for(TEXTS))
        assert cache.stats["hits"] == 3
    assert any(
        "cannot probe" in r.getMessage() and "ReadTimeout" in r.getMessage() for r in caplog.records
    )


# -- faults: retried or refused, and nothing wrong stored -------------------------------------


def _stored(cache: EmbeddingCache, model: str, texts: list[str]) -> list[str]:
    """The texts whose vectors the model's shard holds."""
    found = cache.pipeline.storage.lookup(model, keys_of(texts))
    return [texts[i] for i in found.positions]


def _status(status: int, headers: dict[str, str] | None = None) -> Answer:
    return lambda body: (status, headers or {}, {"error": {"message": f"status {status}"}})


@pytest.mark.parametrize(
    "fault",
    [_status(429, {"retry-after": "0.01"}), _status(500), _status(503, {"retry-after-ms": "5"})],
    ids=["429", "500", "503"],
)
def test_a_transient_fault_is_retried_and_the_right_vectors_stored(
    upstream: tuple[Upstream, str], tmp_path: Path, fault: Answer
) -> None:
    app, url = upstream
    app.script.extend([ok, fault, fault])  # the probe, then two faults
    with _api_cache(tmp_path / "cache", url) as cache:
        got = cache.get_embeddings(TEXTS, "openai:m")
        assert np.array_equal(got, vectors_for(TEXTS))
        assert _stored(cache, f"openai:m;endpoint={url}", TEXTS) == TEXTS
    assert [len(body["input"]) for body, _ in app.requests] == [3, 3, 3, 3]


def test_a_timeout_is_retried_then_refused_and_nothing_is_stored(
    upstream: tuple[Upstream, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, url = upstream
    shard = f"openai:m;endpoint={url}"
    with _api_cache(tmp_path / "cache", url) as cache:
        cache.get_embeddings(TEXTS[:1], "openai:m")  # the probe and one text, at full speed
        engine = cache.pipeline.engine(resolve_model("openai:m", base_url=url))
        client = next(iter(engine._clients.values()))  # type: ignore[attr-defined]
        client._client.timeout = httpx.Timeout(0.1)
        app.delay = 0.3  # every attempt times out...
        retried = openai_client._log_retry

        def faster(state: Any) -> None:
            retried(state)
            app.delay = 0  # ...until the first retry
            monkeypatch.setattr(openai_client, "_log_retry", retried)

        monkeypatch.setattr(openai_client, "_log_retry", faster)
        sent = len(app.requests)
        got = cache.get_embeddings(TEXTS[1:2], "openai:m")
        assert np.array_equal(got, vectors_for(TEXTS[1:2])) and len(app.requests) == sent + 2
        app.delay = 0.3  # now for good
        with pytest.raises(AllProvidersFailedError, match="no answer"):
            cache.get_embeddings(TEXTS[2:], "openai:m")
        assert _stored(cache, shard, TEXTS) == TEXTS[:2]


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("count", "2 vectors for 3 inputs"),
        ("dimension", "dimensions"),
        ("nan", "non-finite"),
        ("truncated", "not JSON"),
    ],
)
def test_a_bad_answer_is_refused_and_stores_nothing(
    upstream: tuple[Upstream, str], tmp_path: Path, kind: str, says: str
) -> None:
    app, url = upstream
    app.script.extend([ok, _bad(kind)])
    with _api_cache(tmp_path / "cache", url) as cache:
        with pytest.raises(AllProvidersFailedError, match=says):
            cache.get_embeddings(TEXTS, "openai:m")
        assert _stored(cache, f"openai:m;endpoint={url}", TEXTS) == []
    assert len(app.requests) == 2  # refused, not retried


def test_an_answer_of_another_dimension_than_the_shard_holds_stores_nothing(
    upstream: tuple[Upstream, str], tmp_path: Path
) -> None:
    app, url = upstream

    def narrower(body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        data = [
            {"index": i, "embedding": base64.b64encode(np.ones(DIM - 1, "<f4").tobytes()).decode()}
            for i in range(len(body["input"]))
        ]
        return 200, {}, {"data": data}

    with _api_cache(tmp_path / "cache", url) as cache:
        cache.get_embeddings(TEXTS[:1], "openai:m")
        app.script.append(narrower)
        with pytest.raises(DimensionMismatchError):
            cache.get_embeddings(TEXTS, "openai:m")
        assert _stored(cache, f"openai:m;endpoint={url}", TEXTS) == TEXTS[:1]


def test_an_interrupted_run_keeps_every_vector_it_paid_for(
    upstream: tuple[Upstream, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests of a few texts each (a small token budget), two at a time; the upstream fails
    for good on one of them: every batch it answered is stored, and the rerun asks only for
    the rest."""
    monkeypatch.setenv("EMBEDDING_CACHE_API_TOKEN_BUDGET", "60")
    monkeypatch.setenv("EMBEDDING_CACHE_API_IN_FLIGHT", "2")
    app, url = upstream
    app.delay = 0.05  # long enough for requests to overlap
    texts = [f"text number {i:03d}" for i in range(40)]  # 15 bytes: 4 per request
    answered: list[str] = []

    def failing(body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        if "text number 021" in body["input"]:
            return 500, {}, {"error": {"message": "this batch fails"}}
        answered.extend(body["input"])
        return ok(body)

    app.script.extend([failing] * 100)
    shard = f"openai:m;endpoint={url}"
    with _api_cache(tmp_path / "cache", url) as cache:
        with pytest.raises(AllProvidersFailedError, match="this batch fails"):
            cache.get_embeddings(texts, "openai:m")
        paid = [t for t in answered if t in texts]
        assert len(paid) >= 20 and sorted(_stored(cache, shard, texts)) == sorted(paid)
        assert max(len(body["input"]) for body, _ in app.requests) == 4
        assert app.most_open == 2
        app.script.clear()
        sent = len(app.requests)
        cache.get_embeddings(texts, "openai:m")
        again = [t for body, _ in app.requests[sent:] for t in body["input"]]
    assert sorted(again) == sorted(set(texts) - set(paid))


def test_each_answer_is_stored_in_a_write_of_its_own_as_it_arrives(
    upstream: tuple[Upstream, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed run loses no answered request: none waits for others to be stored."""
    monkeypatch.setenv("EMBEDDING_CACHE_API_TOKEN_BUDGET", "60")
    app, url = upstream
    texts = [f"text number {i:03d}" for i in range(40)]
    with _api_cache(tmp_path / "cache", url) as cache:
        cache.get_embeddings(["the probe first"], "openai:m")
        writes: list[int] = []
        put = cache.pipeline.storage.put

        def counted(model: str, keys: list[bytes], *args: Any, **kwargs: Any) -> Any:
            writes.append(len(keys))
            return put(model, keys, *args, **kwargs)

        monkeypatch.setattr(cache.pipeline.storage, "put", counted)
        sent = len(app.requests)
        cache.get_embeddings(texts, "openai:m")
    assert writes == [4] * 10 and len(app.requests) == sent + 10


def test_an_interrupt_while_storing_still_stores_the_answers_in_flight(
    upstream: tuple[Upstream, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C lands while the first answer is written: that write is lost, and every other
    answer paid for, those in flight included, is stored before the interrupt goes on."""
    monkeypatch.setenv("EMBEDDING_CACHE_API_TOKEN_BUDGET", "60")
    monkeypatch.setenv("EMBEDDING_CACHE_API_IN_FLIGHT", "2")
    app, url = upstream
    app.delay = 0.1
    texts = [f"text number {i:03d}" for i in range(40)]
    shard = f"openai:m;endpoint={url}"
    with _api_cache(tmp_path / "cache", url) as cache:
        cache.get_embeddings(["the probe first"], "openai:m")
        put = cache.pipeline.storage.put
        interrupted: list[list[bytes]] = []

        def interrupting(model: str, keys: list[bytes], *args: Any, **kwargs: Any) -> Any:
            if not interrupted:
                interrupted.append(keys)
                raise KeyboardInterrupt
            return put(model, keys, *args, **kwargs)

        monkeypatch.setattr(cache.pipeline.storage, "put", interrupting)
        sent = len(app.requests)
        with pytest.raises(KeyboardInterrupt):
            cache.get_embeddings(texts, "openai:m")
        answered = [t for body, _ in app.requests[sent:] for t in body["input"]]
        lost = set(keys_of(texts)) & set(interrupted[0])
        assert len(lost) == 4 and 8 <= len(answered) < len(texts)  # it stopped early
        kept = [t for t, key in zip(answered, keys_of(answered), strict=True) if key not in lost]
        assert sorted(_stored(cache, shard, texts)) == sorted(kept)


def test_the_langchain_adapter_passes_base_url_and_api_key_through(
    upstream: tuple[Upstream, str], tmp_path: Path
) -> None:
    pytest.importorskip("langchain_core")
    from embeddingcache.integrations.langchain import CachedEmbeddings

    app, url = upstream
    embeddings = CachedEmbeddings(
        "openai:m", base_url=url, api_key=KEY, cache_dir=tmp_path / "cache", remote_url=False
    )
    try:
        assert embeddings.embed_documents(TEXTS) == vectors_for(TEXTS).tolist()
    finally:
        embeddings.close()
    assert KEY not in repr(embeddings)
    assert {headers["authorization"] for _, headers in app.requests} == {f"Bearer {KEY}"}


# -- input limits: checked before anything is sent ------------------------------------------

# Over 8,192 tokens of cl100k_base, though not by much in bytes: " x" is one token.
LONG = "start" + " x" * 9000


def test_a_text_over_openais_input_limit_is_refused_by_index_before_anything_is_sent(
    upstream: tuple[Upstream, str], tmp_path: Path
) -> None:
    pytest.importorskip("tiktoken")
    app, url = upstream
    with _api_cache(tmp_path / "cache", url) as cache:
        with pytest.raises(TextTooLongError, match=r"9001 tokens.*at most 8192") as refused:
            cache.get_embeddings(["short", "also short", LONG], "openai:text-embedding-3-small")
    assert refused.value.index == 2
    sent = [text for body, _ in app.requests for text in body["input"]]
    assert LONG not in sent and "short" not in sent  # only the probe was asked


def test_truncate_cuts_a_long_text_to_the_limit_by_tokens(
    upstream: tuple[Upstream, str], tmp_path: Path
) -> None:
    tiktoken = pytest.importorskip("tiktoken")
    from embeddingcache.engines.openai import load_encoding

    app, url = upstream
    model = "openai:text-embedding-3-small"
    with _api_cache(tmp_path / "cache", url) as cache:
        got = cache.get_embeddings(["short", LONG], model, truncate=True)
        assert got.shape == (2, DIM)
        assert cache.count_tokens([LONG], model) == [9001]
    sent = app.requests[-1][0]["input"]
    encoding = load_encoding("text-embedding-3-small")
    assert isinstance(encoding, tiktoken.Encoding) and encoding.encode("hello world") == [
        15339,
        1917,  # cl100k_base itself
    ]
    assert sent[0] == "short" and LONG.startswith(sent[1])
    assert len(encoding.encode(sent[1])) == 8192


def test_truncate_without_a_tokenizer_says_to_install_the_openai_extra(
    upstream: tuple[Upstream, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # not installed
    app, url = upstream
    with _api_cache(tmp_path / "cache", url) as cache:
        with pytest.raises(AllProvidersFailedError, match=r"texts\[1\].*embeddingcache\[openai\]"):
            cache.get_embeddings(["short", LONG], "openai:text-embedding-3-small", truncate=True)
        assert cache.count_tokens(["short"], "openai:text-embedding-3-small") is None
        # Without truncate, the API checks its own limit: the text is sent as it is.
        cache.get_embeddings([LONG], "openai:text-embedding-3-small")
    assert app.requests[-1][0]["input"] == [LONG]


def test_truncate_for_a_model_unknown_to_tiktoken_is_a_clear_error(
    upstream: tuple[Upstream, str], tmp_path: Path
) -> None:
    _, url = upstream
    with _api_cache(tmp_path / "cache", url) as cache:
        with pytest.raises(AllProvidersFailedError, match="input limit and tokenizer are unknown"):
            cache.get_embeddings([LONG], "openai:nomic-embed-text", truncate=True)
        # Short texts need no cut, and a long one is the server's to judge without truncate.
        assert cache.get_embeddings(["short"], "openai:nomic-embed-text", truncate=True).size


# -- the key ----------------------------------------------------------------------------------


def test_the_key_is_in_no_cache_file_log_record_or_error(
    upstream: tuple[Upstream, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every API path (computing, retrying, refused, a bad answer, hits, the LangChain
    adapter's), logged at DEBUG: the key is only ever in the Authorization header."""
    caplog.set_level(logging.DEBUG)
    app, url = upstream
    folder = tmp_path / "cache"
    errors: list[str] = []
    with _api_cache(folder, url) as cache:
        cache.get_embeddings(TEXTS, "openai:m")
        app.script.extend([_status(429, {"retry-after": "0"}), ok])
        cache.get_embeddings(["retried"], "openai:m", api_key=KEY)
        for fault in (_status(401), _bad("nan")):
            app.script.append(fault)
            with pytest.raises(AllProvidersFailedError) as failed:
                cache.get_embeddings(["refused"], "openai:m")
            errors += [str(failed.value), repr(failed.value), str(failed.value.__cause__)]
        cache.get_embeddings(TEXTS, "openai:m")  # hits
        errors += [
            repr(cache),
            repr(cache.pipeline.settings),
            repr(cache.pipeline.engine(resolve_model("openai:m", base_url=url))),
        ]
    assert {headers["authorization"] for _, headers in app.requests} == {f"Bearer {KEY}"}
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files and not [p for p in files if KEY.encode() in p.read_bytes()]
    logged = [r.getMessage() + str(r.args) + str(r.exc_info) for r in caplog.records]
    assert len(logged) > 3 and not [line for line in logged if KEY in line]
    assert not [text for text in errors if KEY in text]


# -- what a hit costs -------------------------------------------------------------------------


def test_a_process_that_only_reads_api_vectors_imports_neither_torch_nor_tiktoken(
    upstream: tuple[Upstream, str], tmp_path: Path
) -> None:
    _, url = upstream
    folder = tmp_path / "cache"
    model = "openai:text-embedding-3-small"
    with _api_cache(folder, url) as cache:
        cache.get_embeddings(TEXTS, model)
    script = (
        "import json, sys\n"
        "from embeddingcache import EmbeddingCache\n"
        f"cache = EmbeddingCache(cache_dir={str(folder)!r}, remote_url=False, base_url={url!r})\n"
        f"vectors = cache.get_embeddings({TEXTS!r}, {model!r})\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'tiktoken': 'tiktoken' in "
        "sys.modules, 'hits': cache.stats['hits'], 'rows': vectors.tolist()}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["torch"] is False and seen["tiktoken"] is False and seen["hits"] == 3
    assert np.array_equal(np.asarray(seen["rows"], dtype=np.float32), vectors_for(TEXTS))
