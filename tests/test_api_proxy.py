"""`embeddingcache serve --model openai:NAME` as a team's caching proxy: the chain client ->
proxy -> upstream (`serve --model TINY`, standing in for the provider), each a real process
on 127.0.0.1. The key lives in the proxy's environment only."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embeddingcache import EmbeddingCache

KEY = "sk-test-proxy-4f1c9e0b7a2d"  # what the upstream requires, as a provider would
KEY_ENV = "EC_TEST_PROVIDER_KEY"
TEXTS = ["the proxy computes this once", "and this", "a third text", "the proxy computes this once"]


@pytest.fixture
def upstream(tiny_model: str, tmp_path: Path, serve_process: Any) -> Any:
    """`serve --model TINY`, standing in for a provider: it requires `KEY`."""
    return serve_process(
        "-m", tiny_model, "--cache-dir", str(tmp_path / "upstream"), "--token", KEY
    )


def _through(upstream: Any, model: str) -> list[str]:
    """The options that name ``openai:MODEL`` at the upstream, its key in `KEY_ENV`."""
    return ["-m", f"openai:{model}", "--base-url", f"{upstream.url}/v1", "--api-key-env", KEY_ENV]


def _upstream_requests(upstream: Any) -> int:
    """How many embedding requests the upstream has answered (its own counter)."""
    answer = httpx.get(
        f"{upstream.url}/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    answer.raise_for_status()
    return int(answer.json()["requests"])


def _upstream_vectors(upstream: Any, model: str, texts: list[str], **asked: Any) -> np.ndarray:
    """The upstream's own answer for ``texts``, base64 float32 as it sent it."""
    answer = httpx.post(
        f"{upstream.url}/v1/embeddings",
        json={"model": model, "input": texts, "encoding_format": "base64", **asked},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    answer.raise_for_status()
    rows = sorted(answer.json()["data"], key=lambda item: item["index"])
    return np.stack([np.frombuffer(base64.b64decode(r["embedding"]), "<f4") for r in rows])


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_a_proxy_serves_every_client_the_upstreams_vectors_and_asks_it_each_text_once(
    store: str,
    tiny_model: str,
    tmp_path: Path,
    upstream: Any,
    serve_process: Any,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """Through the `openai` package and through our msgpack client, vectors bit-equal to the
    upstream's; a second round of both clients sends the upstream nothing; the key is in no
    line the proxy wrote, though it logged every request."""
    import openai

    where = (
        ["--db-url", request.getfixturevalue("pg_url")]
        if store == "postgres"
        else ["--cache-dir", str(tmp_path / "proxy")]
    )
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")  # every line the proxy writes, as it writes it
    model = f"openai:{tiny_model}"
    proxy = serve_process(*_through(upstream, tiny_model), "--access-log", *where)
    monkeypatch.delenv(KEY_ENV)  # the clients run without any key of the provider's
    distinct = list(dict.fromkeys(TEXTS))

    def through_the_sdk() -> tuple[np.ndarray, int]:
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="no provider key here")
        try:
            raw = client.embeddings.with_raw_response.create(model=model, input=TEXTS)
        finally:
            client.close()
        answer = raw.parse()
        got = np.asarray([item.embedding for item in answer.data], dtype=np.float32)
        return got, int(raw.headers["x-embeddingcache-hits"])

    def through_our_client(name: str, **where: Any) -> tuple[np.ndarray, dict[str, Any]]:
        # The client names the model as the proxy does, at the upstream's endpoint: it
        # stores what it is given under that identity (and holds no key).
        with EmbeddingCache(
            model,
            cache_dir=tmp_path / name,
            remote_url=proxy.url,
            fallback_providers=("remote",),
            **(where or {"base_url": f"{upstream.url}/v1"}),
        ) as cache:
            return cache.get_embeddings(TEXTS), dict(cache.stats)

    # A client that names it at OpenAI's endpoint is refused: it would store another
    # server's vectors under OpenAI's name.
    from embeddingcache.errors import EmbeddingCacheError

    with pytest.raises(EmbeddingCacheError, match="served as"):
        through_our_client("client-0", base_url="https://api.openai.com/v1")
    with EmbeddingCache(cache_dir=tmp_path / "client-0", remote_url=False) as refused:
        assert refused.contents().texts == 0

    sdk_first, sdk_hits = through_the_sdk()
    ours_first, stats = through_our_client("client-1")
    after_first = _upstream_requests(upstream)
    assert sdk_hits == 0
    assert stats["remote_hits"] == len(distinct)

    sdk_again, sdk_hits = through_the_sdk()
    ours_again, stats = through_our_client("client-2")
    assert _upstream_requests(upstream) == after_first, "a second round reached the upstream"
    assert sdk_hits == len(TEXTS)
    assert stats["remote_hits"] == len(distinct) and stats["computed"] == 0

    expected = _upstream_vectors(upstream, tiny_model, TEXTS)
    for got in (sdk_first, ours_first, sdk_again, ours_again):
        assert got.dtype == np.float32
        assert got.tobytes() == expected.tobytes()

    deadline = time.monotonic() + 30
    while "POST /v1/embeddings" not in "".join(proxy.output):  # the access log, unbuffered
        assert time.monotonic() < deadline, "".join(proxy.output)
        time.sleep(0.05)
    assert KEY not in "".join(proxy.output)
    if store == "sqlite":
        _assert_no_file_holds_the_key(tmp_path / "proxy")


def test_a_proxy_asks_the_api_for_openais_dimensions_and_keeps_them_in_a_shard_of_their_own(
    tiny_model: str, tmp_path: Path, upstream: Any, serve_process: Any, monkeypatch: Any
) -> None:
    """`dimensions` sent to the proxy is sent on to the API (its shortened vectors are its own,
    never cut here from the full ones), answered bit for bit, and stored apart: asked again,
    through the `openai` package or our client, the upstream hears nothing; more than the
    model has is a 400."""
    import openai

    monkeypatch.setenv(KEY_ENV, KEY)
    proxy = serve_process(*_through(upstream, tiny_model), "--cache-dir", str(tmp_path / "proxy"))
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="no provider key here")
    model = f"openai:{tiny_model}"
    try:
        full = client.embeddings.create(model=model, input=TEXTS)
        assert len(full.data[0].embedding) == 32
        before = _upstream_requests(upstream)
        short = client.embeddings.create(model=model, input=TEXTS, dimensions=16)
        assert _upstream_requests(upstream) > before  # asked of the API, not cut here
        got = np.asarray([item.embedding for item in short.data], dtype=np.float32)
        expected = _upstream_vectors(upstream, tiny_model, TEXTS, dimensions=16)
        assert got.tobytes() == expected.tobytes()
        before = _upstream_requests(upstream)
        again = client.embeddings.create(model=model, input=TEXTS, dimensions=16)
        assert _upstream_requests(upstream) == before
        assert [item.embedding for item in again.data] == [item.embedding for item in short.data]
        with pytest.raises(openai.BadRequestError, match="more than the model's 32"):
            client.embeddings.create(model=model, input=TEXTS, dimensions=33)
    finally:
        client.close()
    # Our client's dimensions=16 of the API model asks the proxy for that shard: served as is.
    monkeypatch.delenv(KEY_ENV)
    with EmbeddingCache(
        model,
        cache_dir=tmp_path / "client",
        remote_url=proxy.url,
        fallback_providers=("remote",),
        base_url=f"{upstream.url}/v1",
    ) as ours:
        assert ours.get_embeddings(TEXTS, dimensions=16).tobytes() == expected.tobytes()
        assert ours.stats["remote_hits"] == len(set(TEXTS))
    with EmbeddingCache(cache_dir=tmp_path / "proxy", remote_url=False) as cache:
        shards = {s.model for s in cache.contents().shards}
    assert f"{model};endpoint={upstream.url}/v1;dimensions=16" in shards


def test_a_proxy_whose_key_the_upstream_refuses_stops_at_once_without_showing_it(
    tiny_model: str, tmp_path: Path, upstream: Any
) -> None:
    """A wrong key is a 401 on the first request the proxy makes: `serve` exits with one line
    naming the endpoint and the model, and neither key appears in it."""
    wrong = "sk-test-wrong-key-0000"
    result = _cli(
        "serve",
        "--port",
        "0",
        *_through(upstream, tiny_model),
        "--cache-dir",
        str(tmp_path / "proxy"),
        key=wrong,
    )
    assert result.returncode == 1, result.stderr
    assert "401" in result.stderr and f"{upstream.url}/v1" in result.stderr
    assert wrong not in result.stderr + result.stdout and KEY not in result.stderr


def _cli(*args: str, key: str) -> subprocess.CompletedProcess[str]:
    """``embeddingcache ARGS`` with ``key`` in the variable `KEY_ENV` and no OPENAI_API_KEY."""
    environ = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "embeddingcache.cli", *args],
        env={**environ, KEY_ENV: key},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _assert_no_file_holds_the_key(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the key is in {path}"


def test_embed_computes_an_api_model_through_base_url_with_the_key_its_variable_holds(
    tiny_model: str, tmp_path: Path, upstream: Any
) -> None:
    """`embeddingcache embed --model openai:NAME --base-url URL --api-key-env NAME`: the
    upstream's vectors, bit for bit; the second run computes nothing; the key is in neither
    output stream, nor in the cache's files."""
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "vectors.npy"
    cache_dir = tmp_path / "cache"
    args = (
        "embed",
        str(source),
        *_through(upstream, tiny_model),
        "--cache-dir",
        str(cache_dir),
        "--out",
        str(out),
    )

    def run() -> subprocess.CompletedProcess[str]:
        return _cli(*args, key=KEY)

    first = run()
    assert first.returncode == 0, first.stderr
    assert "0 from the cache, 0 from the backend, 3 computed" in first.stdout
    expected = _upstream_vectors(upstream, tiny_model, TEXTS)
    assert np.load(out).tobytes() == expected.tobytes()
    requests = _upstream_requests(upstream)
    second = run()
    assert second.returncode == 0, second.stderr
    assert "3 from the cache, 0 from the backend, 0 computed" in second.stdout
    assert np.load(out).tobytes() == expected.tobytes()
    # A new process probes the model's version once (see docs/api-models.md): no texts.
    assert _upstream_requests(upstream) - requests <= 1
    for result in (first, second):
        assert KEY not in result.stdout + result.stderr
    _assert_no_file_holds_the_key(cache_dir)
