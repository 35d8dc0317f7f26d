"""``serve`` as an operator runs it: request ids, honest counts, /metrics, CORS, and slow or
idle connections closed on time (issue 31). Every server here is real, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_token_counts import billing

from embeddingcache.errors import StorageError
from embeddingcache.protocol import Connections
from embeddingcache.server.observe import RequestIdFilter


def embed_v1(url: str, model: str, texts: list[str], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/embeddings", json={"model": model, "input": texts}, headers=headers
    )


# -- request ids -----------------------------------------------------------------------------


def test_every_answer_carries_the_clients_request_id_or_a_new_one(
    start_server: Any, tiny_model: str
) -> None:
    """Success or error, on every route: the client's own id is echoed, else one is made,
    and an id that could forge a log line is replaced."""
    server, _ = start_server(token="secret")
    auth = {"authorization": "Bearer secret"}
    mine = embed_v1(server.url, tiny_model, ["a"], **auth, **{"x-request-id": "job-7/step.2"})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "job-7/step.2"
    made = [
        httpx.get(f"{server.url}/nope"),
        httpx.post(f"{server.url}/v1/embeddings", json={}, headers=auth),
        httpx.get(f"{server.url}/stats"),  # 401
        httpx.get(f"{server.url}/healthz", headers={"x-request-id": "two words"}),
    ]
    assert [a.status_code for a in made] == [404, 400, 401, 200]
    ids = [a.headers["x-request-id"] for a in made]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 4


def test_log_lines_written_for_a_request_carry_its_id(
    start_server: Any, tiny_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The access log line and the error logged for a failed request name the request id
    the client was answered with."""
    server, backend = start_server(app_options={"access_log": True})
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO, logger="embeddingcache")
    answer = embed_v1(server.url, tiny_model, ["logged"], **{"x-request-id": "trace-42"})
    assert answer.status_code == 200
    lines = [r for r in caplog.records if r.name == "embeddingcache.access"]
    assert any(r.request_id == "trace-42" and "/v1/embeddings" in r.getMessage() for r in lines)  # type: ignore[attr-defined]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise StorageError("disk I/O error")  # the fault to inject

    backend.cache.pipeline.vectors = broken
    failed = embed_v1(server.url, tiny_model, ["x"], **{"x-request-id": "trace-43"})
    assert failed.status_code == 503
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.request_id for r in errors] == ["trace-43"]  # type: ignore[attr-defined]


# -- honest counts, /metrics ------------------------------------------------------------------


def _headers_sum(answers: list[httpx.Response]) -> dict[str, int]:
    return {
        source: sum(int(a.headers[f"x-embeddingcache-{header}"]) for a in answers)
        for source, header in (("stored", "hits"), ("waited", "waited"), ("computed", "computed"))
    }


def test_stats_and_metrics_equal_the_sums_of_the_answers_headers_under_concurrency(
    server_with_traffic: tuple[Any, Any, list[httpx.Response]],
) -> None:
    """Requests that waited for another's computation are counted as waited everywhere: the
    headers of all answers add up to /stats and to /metrics' texts by source."""
    server, backend, answers = server_with_traffic
    sums = _headers_sum(answers)
    stats = httpx.get(f"{server.url}/stats").json()
    assert {k: stats[k] for k in sums} == sums
    assert stats["hits"] == sums["stored"]
    assert stats["misses"] == sums["waited"] + sums["computed"]
    assert stats["texts"] == sum(sums.values()) == 12 * 21
    # Each distinct text was computed once; its duplicate in a request counts as an input.
    assert backend.cache.stats["computed"] == 20
    texts = _samples(httpx.get(f"{server.url}/metrics").text, "embeddingcache_texts_total")
    assert {labels["source"]: value for labels, value in texts} == {**sums, "not_found": 0}


@pytest.fixture
def server_with_traffic(
    start_server: Any, tiny_model: str
) -> tuple[Any, Any, list[httpx.Response]]:
    """A server that 12 concurrent clients (both routes) sent the same 20 new texts, one of
    them twice in each request."""
    server, backend = start_server()
    texts = [f"team text {i}" for i in range(20)]
    barrier = threading.Barrier(12)
    answers: list[httpx.Response] = []

    def ask(route: str) -> None:
        barrier.wait()
        if route == "v1":
            answers.append(embed_v1(server.url, tiny_model, [*texts, texts[0]]))
        else:
            answers.append(httpx.post(f"{server.url}/embed", json={"texts": [*texts, texts[0]]}))

    threads = [threading.Thread(target=ask, args=(r,)) for r in ["v1", "embed"] * 6]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200] * 12
    return server, backend, answers


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def test_metrics_count_requests_latency_tokens_and_storage_errors_behind_the_token(
    start_server: Any, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics is Prometheus's text format, needs the token when the server has one, and
    counts requests by route and status, their latency, tokens per model and storage
    failures."""
    server, backend = start_server(token="secret")
    billing(backend.cache, monkeypatch)  # the tiny model's tokens are counted as an API's
    auth = {"authorization": "Bearer secret"}
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    for _ in range(3):
        assert embed_v1(server.url, tiny_model, ["metered text"], **auth).status_code == 200
    assert embed_v1(server.url, tiny_model, [" "], **auth).status_code == 400

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise StorageError("database is locked")  # the fault to inject

    backend.cache.pipeline.vectors = broken
    assert embed_v1(server.url, tiny_model, ["x"], **auth).status_code == 503
    scraped = httpx.get(f"{server.url}/metrics", headers=auth)
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    text = scraped.text
    requests = {
        (labels["route"], labels["status"]): value
        for labels, value in _samples(text, "embeddingcache_requests_total")
        if labels["method"] == "POST"
    }
    assert requests == {
        ("/v1/embeddings", "200"): 3,
        ("/v1/embeddings", "400"): 1,
        ("/v1/embeddings", "503"): 1,
    }
    latency = _samples(text, "embeddingcache_request_duration_seconds_count")
    assert ({"route": "/v1/embeddings"}, 5.0) in latency
    [(model, tokens)] = backend.stats()["tokens"].items()
    assert tokens["computed"] > 0 and tokens["saved"] == 2 * tokens["computed"]
    assert _samples(text, "embeddingcache_tokens_computed_total") == [
        ({"model": model}, tokens["computed"])
    ]
    assert _samples(text, "embeddingcache_tokens_saved_total") == [
        ({"model": model}, tokens["saved"])
    ]
    assert _samples(text, "embeddingcache_storage_errors_total") == [({}, 1.0)]
    assert _samples(text, "process_open_fds")  # the process's own, for the connection bound


def test_unknown_paths_share_one_metrics_label(start_server: Any) -> None:
    """A scanner's thousand paths are one label value, "other", not a thousand series."""
    server, _ = start_server()
    for i in range(5):
        httpx.get(f"{server.url}/wp-admin/{i}")
    routes = {
        labels["route"]
        for labels, _ in _samples(
            httpx.get(f"{server.url}/metrics").text, "embeddingcache_requests_total"
        )
    }
    assert "other" in routes and not any(r.startswith("/wp-admin") for r in routes)


# -- CORS --------------------------------------------------------------------------------------

PREFLIGHT = {
    "access-control-request-method": "POST",
    "access-control-request-headers": "authorization,content-type",
}


def test_cors_is_off_unless_an_origin_is_named(start_server: Any) -> None:
    """Without --cors-origin a browser's preflight gets no allowance (405, OpenAI's shape)."""
    server, _ = start_server()
    answer = httpx.options(
        f"{server.url}/v1/embeddings", headers={"origin": "https://app.example", **PREFLIGHT}
    )
    assert answer.status_code == 405 and "access-control-allow-origin" not in answer.headers
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_cors_allows_the_named_origins_only(start_server: Any, tiny_model: str) -> None:
    """A named origin's preflight and request are allowed and may read our headers; any
    other origin gets no allowance."""
    server, _ = start_server(app_options={"cors_origins": ["https://app.example"]})
    url = f"{server.url}/v1/embeddings"
    allowed = httpx.options(url, headers={"origin": "https://app.example", **PREFLIGHT})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = httpx.options(url, headers={"origin": "https://evil.example", **PREFLIGHT})
    assert "access-control-allow-origin" not in other.headers
    answer = embed_v1(server.url, tiny_model, ["cors"], origin="https://app.example")
    assert answer.headers["access-control-allow-origin"] == "https://app.example"
    exposed = answer.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed and "x-embeddingcache-hits" in exposed


# -- slow, silent and too many connections ----------------------------------------------------


async def _closed_after(
    reader: asyncio.StreamReader, opened: float, limit: float
) -> tuple[float, bytes]:
    """Seconds until the server closed the connection, and what it said before."""
    said = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(1024), limit):
            said += chunk
    except (ConnectionError, asyncio.TimeoutError):
        pass
    return time.monotonic() - opened, said


async def _trickle(writer: asyncio.StreamWriter, stop: asyncio.Event) -> None:
    request = b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    for byte in request:
        if stop.is_set() or writer.is_closing():
            return
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(0.5)


async def _siege(
    url: str, model: str, silent: int, trickling: int
) -> tuple[list[float], list[bytes], list[int]]:
    host, port = url.removeprefix("http://").split(":")
    opened = time.monotonic()
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(silent + trickling)]
    stop = asyncio.Event()
    tricklers = [asyncio.create_task(_trickle(w, stop)) for _, w in conns[silent:]]
    closing = [asyncio.create_task(_closed_after(r, opened, 20)) for r, _ in conns]
    statuses = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for i in range(6):  # real requests while the siege lasts
            answer = await client.post(
                "/v1/embeddings", json={"model": model, "input": [f"real {i}"]}
            )
            statuses.append(answer.status_code)
            await asyncio.sleep(1)
    closed = await asyncio.gather(*closing)
    stop.set()
    await asyncio.gather(*tricklers)
    for _, writer in conns:
        writer.close()
    return [c[0] for c in closed], [c[1] for c in closed], statuses


def test_silent_and_trickling_connections_are_closed_by_default_and_requests_served(
    start_server: Any, tiny_model: str
) -> None:
    """Under 300 silent and 100 trickling connections real requests are served, and by
    default every one of those is closed within 15 s (10 s without complete headers)."""
    server, _ = start_server()
    seconds, said, statuses = asyncio.run(_siege(server.url, tiny_model, 300, 100))
    assert statuses == [200] * 6
    assert max(seconds) < 15, sorted(seconds)[-5:]
    assert min(seconds) > 9  # the header timeout, not something else, closed them
    # A trickler had sent part of its headers: it is told why.
    assert all(s.startswith(b"HTTP/1.1 408") for s in said[300:])
    assert all(s == b"" for s in said[:300])


async def _open_many(url: str, n: int) -> list[bytes]:
    host, port = url.removeprefix("http://").split(":")
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(n)]
    first = await asyncio.gather(*(_closed_after(r, time.monotonic(), 1.0) for r, _ in conns))
    for _, writer in conns:
        writer.close()
    return [said for _, said in first]


def test_connections_beyond_the_bound_get_a_503_and_are_closed_at_once(
    start_server: Any, tiny_model: str
) -> None:
    """Past ``max_connections`` open, a new connection is answered 503 and closed, so that
    silent sockets cannot use up the server's descriptors; once they go, requests pass."""
    server, _ = start_server(connections=Connections(header_timeout_s=2, max_connections=20))
    said = asyncio.run(_open_many(server.url, 30))
    refused = [s for s in said if s.startswith(b"HTTP/1.1 503")]
    assert len(refused) == 10 and b"retry-after: 1" in refused[0]
    time.sleep(2.5)  # the silent ones time out
    assert embed_v1(server.url, tiny_model, ["after"]).status_code == 200


def test_an_idle_connection_after_an_answer_is_closed_after_keep_alive(
    start_server: Any,
) -> None:
    """A keep-alive connection left idle is closed after ``keep_alive_s``."""
    server, _ = start_server(connections=Connections(keep_alive_s=1))

    async def idle() -> tuple[float, bytes]:
        host, port = server.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        await writer.drain()
        closed = await _closed_after(reader, time.monotonic(), 8)
        writer.close()
        return closed

    seconds, said = asyncio.run(idle())
    assert said.startswith(b"HTTP/1.1 200") and seconds < 3


# -- the command ------------------------------------------------------------------------------


def test_serve_takes_the_production_options_and_logs_request_ids(
    tiny_model: str, tmp_path: Any, serve_process: Any
) -> None:
    """``serve --truncate --cors-origin --access-log`` and the connection limits reach the
    running server; its access log line names the request's id."""
    server = serve_process(
        "-m",
        tiny_model,
        "--cache-dir",
        str(tmp_path / "server"),
        "--truncate",
        "--cors-origin",
        "https://app.example",
        "--access-log",
        "--header-timeout",
        "3",
        "--keep-alive",
        "2",
        "--max-connections",
        "64",
    )
    answer = httpx.post(
        f"{server.url}/v1/embeddings",
        json={"model": tiny_model, "input": "x" * 100},
        headers={"origin": "https://app.example", "x-request-id": "cli-check-1"},
        timeout=60,
    )
    assert answer.status_code == 200  # truncated, by the server's default
    assert answer.headers["access-control-allow-origin"] == "https://app.example"
    assert "embeddingcache_requests_total" in httpx.get(f"{server.url}/metrics").text
    deadline = time.monotonic() + 10
    while not any("cli-check-1" in line for line in server.output):
        assert time.monotonic() < deadline, "".join(server.output)
        time.sleep(0.1)
    [line] = [line for line in server.output if "cli-check-1" in line]
    assert '"POST /v1/embeddings" 200' in line
