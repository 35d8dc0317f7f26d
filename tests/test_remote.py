"""The client's side of the backend: lookups, the fallback chain, push, and failures."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embeddingcache import AllProvidersFailedError, EmbeddingCache, TextTooLongError

TEXTS = ["one text", "two texts", "three texts", "four texts"]


def client(tiny_model: str, tmp_path: Path, url: str, name: str = "client", **options: Any) -> Any:
    """A cache of its own (a separate directory) that talks to the backend at ``url``."""
    options.setdefault("device", "cpu")
    return EmbeddingCache(tiny_model, cache_dir=tmp_path / name, remote_url=url, **options)


def server_stats(url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{url}/stats").json()
    return stats


def test_a_remote_only_client_gets_the_vectors_a_local_one_computes(
    start_server: Any, tiny_model: str, tmp_path: Path, direct_model: Any
) -> None:
    server, _ = start_server()
    with (
        client(tiny_model, tmp_path, server.url, fallback_providers=("remote",)) as remote,
        EmbeddingCache(tiny_model, cache_dir=tmp_path / "local", device="cpu") as local,
    ):
        from_backend = remote.get_embeddings(TEXTS)
        np.testing.assert_array_equal(from_backend, local.get_embeddings(TEXTS))
        np.testing.assert_array_equal(from_backend, direct_model.encode(TEXTS))
        # The backend computed them for this client, which computed none itself.
        assert remote.stats["remote_computed"] == 4 and remote.stats["computed"] == 0
        assert remote.stats["remote_hits"] == 0
        assert not remote.pipeline.loaded_engines()  # no local model was loaded
        # Stored locally: the next call is answered without the backend.
        before = server_stats(server.url)["requests"]
        np.testing.assert_array_equal(remote.get_embeddings(TEXTS), from_backend)
        assert server_stats(server.url)["requests"] == before
        assert remote.stats["hits"] == 4


def test_vectors_the_backend_holds_are_counted_as_remote_hits_and_kept(
    start_server: Any, tiny_model: str, tmp_path: Path, encode_spy: Any
) -> None:
    server, backend = start_server()
    with client(tiny_model, tmp_path, server.url, "a", fallback_providers=("remote",)) as a:
        computed = a.get_embeddings(TEXTS[:3])
    encode_spy.calls.clear()
    with client(tiny_model, tmp_path, server.url, "b") as b:
        vectors = b.get_embeddings(TEXTS)
        assert b.stats == {
            "hits": 0,
            "misses": 4,
            "remote_hits": 3,
            "computed": 1,
            "remote_computed": 0,
            "waited": 0,
            "pushed": 0,
            "not_stored": 0,
            "tokens_computed": 0,  # a local model's tokens are not counted
            "tokens_saved": 0,
        }
        np.testing.assert_array_equal(vectors[:3], computed)
        # Only the text the backend lacked was computed, here.
        assert encode_spy.texts == [TEXTS[3]]
        assert b.contents().shards[0].entries == 4
    assert backend.stats()["computed"] == 3


def test_a_backend_killed_mid_session_means_fallback_to_the_local_model(
    serve_process: Any, tiny_model: str, tmp_path: Path, direct_model: Any
) -> None:
    server = serve_process("--model", tiny_model, "--cache-dir", str(tmp_path / "server"))
    with client(tiny_model, tmp_path, server.url, fallback_providers=("remote", "local")) as c:
        c.get_embeddings(TEXTS[:2])
        assert c.stats["remote_computed"] == 2 and c.stats["computed"] == 0
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        vectors = c.get_embeddings(TEXTS)
        # Each half bit for bit as the model computes it in that batch.
        np.testing.assert_array_equal(vectors[:2], direct_model.encode(TEXTS[:2]))
        np.testing.assert_array_equal(vectors[2:], direct_model.encode(TEXTS[2:]))
        assert c.stats["hits"] == 2 and c.stats["computed"] == 2


def slow(app: Any, delay: float) -> Any:
    """The app, answering every HTTP request ``delay`` seconds late (a fault: a slow backend)."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await asyncio.sleep(delay)
        await app(scope, receive, send)

    return wrapped


@pytest.mark.parametrize("chain", [("local", "remote"), ("remote", "local")])
def test_a_backend_slower_than_the_timeout_is_given_up_within_it(
    start_server: Any, tiny_model: str, tmp_path: Path, direct_model: Any, chain: Any
) -> None:
    server, _ = start_server(wrap=lambda app: slow(app, 5.0))
    timeout = 1.0
    with client(tiny_model, tmp_path, server.url, timeout=timeout, fallback_providers=chain) as c:
        c.dimension()  # load the local model first: only the backend's time is measured
        started = time.monotonic()
        vectors = c.get_embeddings(TEXTS)
        elapsed = time.monotonic() - started
        np.testing.assert_array_equal(vectors, direct_model.encode(TEXTS))
        assert c.stats["remote_hits"] == 0 and c.stats["computed"] == 4
    # Behaviour, not speed: the client gave up before the backend's answer came (5 s late);
    # the bound leaves room for a loaded machine (1.52 s once, beside a stress test).
    assert elapsed < 4.0, f"waited {elapsed:.2f} s: the timeout did not cut the request off"


def test_the_token_is_sent_and_a_wrong_one_means_fallback(
    start_server: Any, tiny_model: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, backend = start_server(token="s3cret")
    with client(
        tiny_model, tmp_path, server.url, "right", token="s3cret", fallback_providers=("remote",)
    ) as right:
        right.get_embeddings(TEXTS[:2])
        assert right.stats["remote_computed"] == 2
    assert backend.stats()["computed"] == 2
    with (
        caplog.at_level(logging.WARNING, logger="embeddingcache"),
        client(tiny_model, tmp_path, server.url, "wrong", token="nope") as wrong,
    ):
        wrong.get_embeddings(TEXTS[:2])
        assert wrong.stats["remote_hits"] == 0 and wrong.stats["computed"] == 2
    assert any(r.levelno == logging.WARNING and "401" in r.getMessage() for r in caplog.records)
    assert backend.stats()["rejected"] >= 1


def test_the_token_can_come_from_the_environment(
    start_server: Any, tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = start_server(token="from-env")
    monkeypatch.setenv("EMBEDDING_CACHE_TOKEN", "from-env")
    monkeypatch.setenv("EMBEDDING_CACHE_URL", server.url)
    with EmbeddingCache(
        tiny_model, cache_dir=tmp_path / "env", fallback_providers=("remote",)
    ) as c:
        c.get_embeddings(TEXTS[:1])
        assert c.remote_url == server.url and c.stats["remote_computed"] == 1


def test_push_sends_local_vectors_to_a_backend_that_allows_it(
    start_server: Any, tiny_model: str, tmp_path: Path
) -> None:
    server, backend = start_server(allow_push=True)
    with client(tiny_model, tmp_path, server.url, "pusher", push=True) as pusher:
        vectors = pusher.get_embeddings(TEXTS)
        assert pusher.stats["pushed"] == 4
    assert backend.stats()["accepted_pushes"] == 4 and backend.stats()["computed"] == 0
    with client(tiny_model, tmp_path, server.url, "reader", fallback_providers=()) as reader:
        np.testing.assert_array_equal(reader.get_embeddings(TEXTS), vectors)
        assert reader.stats["remote_hits"] == 4


def test_push_to_a_backend_that_refuses_it_changes_nothing_for_the_caller(
    start_server: Any, tiny_model: str, tmp_path: Path, direct_model: Any
) -> None:
    server, backend = start_server()
    with client(tiny_model, tmp_path, server.url, "pusher", push=True) as pusher:
        vectors = pusher.get_embeddings(TEXTS)
        assert pusher.stats["pushed"] == 0
    np.testing.assert_array_equal(vectors, direct_model.encode(TEXTS))
    assert backend.stats()["accepted_pushes"] == 0
    with client(tiny_model, tmp_path, server.url, "reader", fallback_providers=()) as reader:
        with pytest.raises(AllProvidersFailedError):
            reader.get_embeddings(TEXTS)


def test_without_push_nothing_computed_here_reaches_the_backend(
    start_server: Any, tiny_model: str, tmp_path: Path
) -> None:
    server, backend = start_server(allow_push=True)
    with client(tiny_model, tmp_path, server.url) as c:
        c.get_embeddings(TEXTS)
    assert backend.stats()["accepted_pushes"] == 0
    assert backend.stats()["hits"] == 0 and backend.stats()["computed"] == 0


def test_when_every_provider_fails_the_error_says_what_was_tried(
    tiny_model: str, tmp_path: Path
) -> None:
    from embeddingcache.server import bind

    with bind("127.0.0.1", 0) as sock:  # a port nobody answers on once closed
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with client(tiny_model, tmp_path, url, fallback_providers=("remote",)) as c:
        with pytest.raises(AllProvidersFailedError) as raised:
            c.get_embeddings(TEXTS)
    message = str(raised.value)
    assert "remote (the backend at " in message and "did not answer" in message
    assert "add 'local' to fallback_providers" in message
    assert f"or check the backend at {url}" in message


def test_a_text_too_long_for_the_backends_model_is_the_callers_error(
    start_server: Any, tiny_model: str, tmp_path: Path
) -> None:
    server, _ = start_server()
    with client(tiny_model, tmp_path, server.url, fallback_providers=("remote",)) as c:
        with pytest.raises(TextTooLongError) as raised:
            c.get_embeddings(["short", "fine", "x" * 100])
        assert raised.value.index == 2
        np.testing.assert_array_equal(
            c.get_embeddings("x" * 100, truncate=True).shape, np.array([32])
        )


def test_two_servers_over_one_postgres_serve_each_others_vectors(
    serve_process: Any, pg_url: str, tiny_model: str, tmp_path: Path
) -> None:
    a = serve_process("--model", tiny_model, "--db-url", pg_url)
    b = serve_process("--model", tiny_model, "--db-url", pg_url)
    with client(tiny_model, tmp_path, a.url, "via-a", fallback_providers=("remote",)) as via_a:
        computed = via_a.get_embeddings(TEXTS)
    with client(tiny_model, tmp_path, b.url, "via-b", fallback_providers=()) as via_b:
        np.testing.assert_array_equal(via_b.get_embeddings(TEXTS), computed)
        assert via_b.stats["remote_hits"] == 4
    assert server_stats(a.url)["computed"] == 4
    assert server_stats(b.url)["computed"] == 0 and server_stats(b.url)["hits"] == 4


def test_a_dead_backend_is_not_asked_again_for_a_while(
    start_server: Any, tiny_model: str, tmp_path: Path
) -> None:
    server, _backend = start_server(wrap=lambda app: slow(app, 5.0))
    with client(tiny_model, tmp_path, server.url, timeout=0.5) as c:
        c.dimension()
        started = time.monotonic()
        c.get_embeddings(TEXTS[:2])
        first = time.monotonic() - started
        started = time.monotonic()
        c.get_embeddings(TEXTS[2:])
        second = time.monotonic() - started
    assert first >= 0.5 and second < 0.4, (first, second)


def test_more_texts_than_one_request_holds_come_back_in_order(
    start_server: Any, tiny_model: str, tmp_path: Path, direct_model: Any
) -> None:
    server, backend = start_server()
    from embeddingcache.engines.backend import COMPUTE_TEXTS

    texts = [f"text number {i}" for i in range(2500)]
    with client(tiny_model, tmp_path, server.url, fallback_providers=("remote",)) as c:
        vectors = c.get_embeddings(texts)
    # Each request's texts are one encode() on the server: bit for bit the same.
    for start in range(0, len(texts), COMPUTE_TEXTS):
        chunk = texts[start : start + COMPUTE_TEXTS]
        np.testing.assert_array_equal(
            vectors[start : start + COMPUTE_TEXTS], direct_model.encode(chunk)
        )
    assert backend.stats()["computed"] == 2500
    # Looked up again by a fresh client: two lookup requests in flight at once (2,048 texts
    # each at most), their answers put back in input order.
    shuffled = texts[::-1]
    with client(tiny_model, tmp_path, server.url, "fresh") as fresh:
        again = fresh.get_embeddings(shuffled)
        assert fresh.stats["remote_hits"] == 2500 and fresh.stats["computed"] == 0
    np.testing.assert_array_equal(again, vectors[::-1])


def test_the_client_keeps_to_the_servers_limits(
    start_server: Any, tiny_model: str, tmp_path: Path, direct_model: Any
) -> None:
    from embeddingcache.protocol import Limits

    server, backend = start_server(limits=Limits(max_texts=5, max_text_chars=30))
    texts = [f"text number {i}" for i in range(23)]
    with client(tiny_model, tmp_path, server.url, "a", fallback_providers=("remote",)) as a:
        vectors = a.get_embeddings(texts)
    np.testing.assert_allclose(vectors, direct_model.encode(texts), atol=1e-6)
    assert backend.stats()["computed"] == 23 and backend.stats()["rejected"] == 0
    # A text longer than the server takes is not asked for; the rest still are.
    with client(tiny_model, tmp_path, server.url, "b") as b:
        b.get_embeddings([*texts[:3], "a text longer than thirty characters"])
        assert b.stats["remote_hits"] == 3 and b.stats["computed"] == 1
    assert backend.stats()["rejected"] == 0


def _hold_writes(monkeypatch: pytest.MonkeyPatch, fail: int = 0) -> tuple[Any, list[int]]:
    """A fault on the writer thread only: each of its `Store.put` waits for the event
    returned (a slow local disk), and the first ``fail`` of them raise. The sizes of the
    writes that landed go in the list returned."""
    from embeddingcache import StorageError
    from embeddingcache.storage import Store

    release, landed, failures = threading.Event(), [], [fail]
    original = Store.put

    def put(self: Any, model: str, keys: Any, *args: Any, **kwargs: Any) -> int:
        if threading.current_thread().name.startswith("embeddingcache-writer"):
            release.wait(30)
            if failures[0]:
                failures[0] -= 1
                raise StorageError("the disk is full (injected)")
        kept = original(self, model, keys, *args, **kwargs)
        landed.append(len(keys))
        return kept

    monkeypatch.setattr(Store, "put", put)
    return release, landed


def local_only(tiny_model: str, tmp_path: Path, name: str) -> EmbeddingCache:
    return EmbeddingCache(tiny_model, cache_dir=tmp_path / name, remote_url=False, device="cpu")


def test_the_backends_vectors_come_back_before_they_are_stored_here_and_land_by_close(
    start_server: Any, tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = start_server()
    with client(tiny_model, tmp_path, server.url, "a", fallback_providers=("remote",)) as a:
        computed = a.get_embeddings(TEXTS)
    release, landed = _hold_writes(monkeypatch)
    with client(tiny_model, tmp_path, server.url, "b", fallback_providers=()) as b:
        first = b.get_embeddings(TEXTS)
        assert landed == []  # the call did not wait for its write
        # A later call before the write landed asks the backend again: the same vectors.
        np.testing.assert_array_equal(b.get_embeddings(TEXTS), first)
        assert b.stats["remote_hits"] == 8 and b.stats["misses"] == 8
        release.set()
    assert landed == [4, 4]  # close waited for both writes
    np.testing.assert_array_equal(first, computed)
    with local_only(tiny_model, tmp_path, "b") as stored:
        np.testing.assert_array_equal(stored.get_embeddings(TEXTS), computed)
        assert stored.stats["hits"] == 4


def test_a_failed_write_of_the_backends_vectors_is_logged_and_loses_nothing_else(
    start_server: Any,
    tiny_model: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    direct_model: Any,
) -> None:
    server, _ = start_server()
    with client(tiny_model, tmp_path, server.url, "a", fallback_providers=("remote",)) as a:
        on_backend = a.get_embeddings(TEXTS[:2])
    release, landed = _hold_writes(monkeypatch, fail=1)
    release.set()
    with (
        caplog.at_level(logging.WARNING, logger="embeddingcache"),
        client(tiny_model, tmp_path, server.url, "b") as b,
    ):
        # The backend has two texts; the other two are computed here, in the same call.
        vectors = b.get_embeddings(TEXTS)
        assert b.stats["remote_hits"] == 2 and b.stats["computed"] == 2
        np.testing.assert_array_equal(vectors[:2], on_backend)
        np.testing.assert_array_equal(vectors[2:], direct_model.encode(TEXTS[2:]))
        # The failure is not raised into this or a later call; that one asks the backend
        # again for what was not stored, and its write lands.
        np.testing.assert_array_equal(b.get_embeddings(TEXTS), vectors)
        assert b.stats["remote_hits"] == 4 and b.stats["hits"] == 2
    assert landed == [2, 2]  # the computed slice, then the second call's backend vectors
    assert any("could not store the backend's vectors" in r.getMessage() for r in caplog.records)
    with local_only(tiny_model, tmp_path, "b") as stored:
        np.testing.assert_array_equal(stored.get_embeddings(TEXTS), vectors)
        assert stored.stats["hits"] == 4


def test_a_damaged_vector_is_replaced_by_the_backends(
    start_server: Any, tiny_model: str, tmp_path: Path
) -> None:
    import sqlite3

    from embeddingcache import EmbeddingCacheWarning
    from embeddingcache.keys import key_of, model_slug

    server, _ = start_server()
    with client(tiny_model, tmp_path, server.url, "a", fallback_providers=("remote",)) as a:
        computed = a.get_embeddings(TEXTS)
    shard = tmp_path / "a" / f"{model_slug(tiny_model)}.db"
    with sqlite3.connect(shard) as db:
        db.execute(
            "UPDATE embedding SET vector = substr(vector, 1, 10) WHERE hashid = ?",
            (key_of(TEXTS[1]),),
        )
    with client(tiny_model, tmp_path, server.url, "a", fallback_providers=()) as again:
        with pytest.warns(EmbeddingCacheWarning, match="1 stored vector.*wrong length.*backend"):
            np.testing.assert_array_equal(again.get_embeddings(TEXTS), computed)
        assert again.stats["hits"] == 3 and again.stats["remote_hits"] == 1
    with sqlite3.connect(shard) as db:
        assert db.execute("SELECT DISTINCT length(vector) FROM embedding").fetchall() == [(128,)]
    with local_only(tiny_model, tmp_path, "a") as stored:
        np.testing.assert_array_equal(stored.get_embeddings(TEXTS), computed)


def test_a_call_waits_for_earlier_writes_of_the_backends_vectors_beyond_the_bound(
    start_server: Any, tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long job of remote hits holds a bounded number of chunks waiting to be stored."""
    from embeddingcache.pipeline import writer

    server, _ = start_server()
    with client(tiny_model, tmp_path, server.url, "a", fallback_providers=("remote",)) as a:
        a.get_embeddings(TEXTS)
    monkeypatch.setattr(writer, "REMOTE_WRITES_AHEAD", 1)
    release, landed = _hold_writes(monkeypatch)
    with client(tiny_model, tmp_path, server.url, "b", fallback_providers=()) as b:
        b.get_embeddings(TEXTS[:2])
        assert landed == []  # one write may wait
        returned: list[list[int]] = []
        second = threading.Thread(
            target=lambda: (b.get_embeddings(TEXTS[2:]), returned.append(list(landed)))
        )
        second.start()
        release.set()
        second.join(60)
        # The second call returned once the first write had landed (its own may have too).
        assert len(returned) == 1 and len(returned[0]) >= 1
    assert landed == [2, 2]
