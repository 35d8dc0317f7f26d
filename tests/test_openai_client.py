"""The OpenAI-compatible client: retries what is worth it, refuses bad answers, hides the key."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from conftest import RunningServer

from embeddingcache import openai_client
from embeddingcache.openai_client import APIError, OpenAIClient, endpoint_of

KEY = "sk-test-do-not-leak-0123456789"
DIM = 8

Answer = Callable[[dict[str, Any]], Any]


def _b64(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def vectors_for(texts: list[str]) -> np.ndarray:
    """A deterministic answer: each text's vector from its length and position."""
    return np.array(
        [[len(t) + i * 0.5 + j / 7 for j in range(DIM)] for i, t in enumerate(texts)],
        dtype=np.float32,
    )


def ok(body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    data = [
        {"object": "embedding", "index": i, "embedding": _b64(v)}
        for i, v in enumerate(vectors_for(body["input"]))
    ]
    return 200, {}, {"object": "list", "data": data, "model": body["model"]}


class Upstream:
    """A small ASGI app speaking OpenAI's /embeddings, answering from a script of faults."""

    def __init__(self) -> None:
        self.script: list[Callable[[dict[str, Any]], tuple[int, dict[str, str], Any]]] = []
        self.requests: list[tuple[dict[str, Any], dict[str, str]]] = []
        self.targets: list[str] = []  # each request's path and query
        self.delay = 0.0
        self.open = 0
        self.most_open = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append((body, headers))
        self.targets.append(f"{scope['path']}?{scope['query_string'].decode()}")
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            answer = self.script.pop(0) if self.script else ok
            if self.delay:
                await asyncio.sleep(self.delay)
            status, extra, payload = answer(body)
        finally:
            self.open -= 1
        content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        head = [(b"content-type", b"application/json")]
        head += [(k.encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": content})


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Upstream, str]]:
    monkeypatch.setattr(openai_client, "WAIT_SCALE", 0.001)
    app = Upstream()
    server = RunningServer(app)
    try:
        yield app, server.url + "/v1"
    finally:
        server.stop()


def client(url: str, **options: Any) -> OpenAIClient:
    return OpenAIClient(url, api_key=KEY, timeout=options.pop("timeout", 5.0), **options)


def test_vectors_come_back_bit_for_bit_from_base64_with_the_key_sent(
    upstream: tuple[Upstream, str],
) -> None:
    app, url = upstream
    texts = ["a", "bb", "ccc"]
    got = client(url).embed("m", texts)
    assert got.dtype == np.float32 and np.array_equal(got, vectors_for(texts))
    body, headers = app.requests[0]
    assert body == {"model": "m", "input": texts, "encoding_format": "base64"}
    assert headers["authorization"] == f"Bearer {KEY}"


def test_an_answer_in_json_floats_and_out_of_order_is_put_in_input_order(
    upstream: tuple[Upstream, str],
) -> None:
    app, url = upstream
    texts = ["x", "yy"]
    rows = vectors_for(texts)
    data = [
        {"index": 1, "embedding": rows[1].tolist()},
        {"index": 0, "embedding": rows[0].tolist()},
    ]
    app.script.append(lambda body: (200, {}, {"data": data}))
    assert np.array_equal(client(url).embed("m", texts), rows)


@pytest.mark.parametrize(
    "headers", [{"retry-after": "0.01"}, {"retry-after-ms": "10"}, {}], ids=["s", "ms", "none"]
)
def test_a_429_is_retried_after_the_wait_it_asks_for(
    upstream: tuple[Upstream, str], headers: dict[str, str]
) -> None:
    app, url = upstream
    app.script.append(lambda body: (429, headers, {"error": {"message": "slow down"}}))
    assert np.array_equal(client(url).embed("m", ["a"]), vectors_for(["a"]))
    assert len(app.requests) == 2


def test_server_errors_are_retried_a_bounded_number_of_times_then_raised(
    upstream: tuple[Upstream, str],
) -> None:
    app, url = upstream
    app.script.extend([lambda body: (500, {}, {"error": {"message": "boom"}})] * 10)
    with pytest.raises(APIError, match=r"/v1/embeddings \(model 'm'\): HTTP 500: boom") as failed:
        client(url, max_attempts=3).embed("m", ["a"])
    assert failed.value.status == 500 and failed.value.retried
    assert len(app.requests) == 3


def test_a_timeout_is_retried(upstream: tuple[Upstream, str]) -> None:
    app, url = upstream
    app.delay = 0.5
    app.script.append(ok)
    with pytest.raises(APIError, match="no answer") as failed:
        client(url, timeout=0.1, max_attempts=2).embed("m", ["a"])
    assert failed.value.status is None and len(app.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_a_refusal_is_not_retried_and_names_endpoint_model_and_the_servers_message(
    upstream: tuple[Upstream, str], status: int
) -> None:
    app, url = upstream
    app.script.append(lambda body: (status, {}, {"error": {"message": "no such model"}}))
    with pytest.raises(APIError) as failed:
        client(url).embed("text-embedding-x", ["a"])
    message = str(failed.value)
    assert url + "/embeddings" in message and "'text-embedding-x'" in message
    assert f"HTTP {status}: no such model" in message and KEY not in message
    assert failed.value.status == status and not failed.value.retried
    assert len(app.requests) == 1


def _bad(kind: str) -> Callable[[dict[str, Any]], tuple[int, dict[str, str], Any]]:
    def answer(body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        _, _, good = ok(body)
        data = good["data"]
        if kind == "count":
            data.pop()
        elif kind == "index":
            data[1]["index"] = 0
        elif kind == "dimension":
            data[1]["embedding"] = _b64(np.ones(DIM - 1))
        elif kind == "nan":
            data[0]["embedding"] = _b64(np.full(DIM, np.nan))
        elif kind == "base64":
            data[0]["embedding"] = "not base64!"
        elif kind == "truncated":
            return 200, {}, json.dumps(good).encode()[:-7]
        return 200, {}, good

    return answer


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("count", "1 vectors for 2 inputs"),
        ("index", "index 0 is missing, repeated"),
        ("dimension", "dimensions"),
        ("nan", "non-finite"),
        ("base64", "not base64"),
        ("truncated", "not JSON"),
    ],
)
def test_a_bad_answer_is_refused_and_says_what_was_wrong(
    upstream: tuple[Upstream, str], kind: str, says: str
) -> None:
    app, url = upstream
    app.script.append(_bad(kind))
    with pytest.raises(APIError, match="unusable answer") as failed:
        client(url).embed("m", ["a", "b"])
    assert says in str(failed.value)
    assert len(app.requests) == 1  # a wrong answer is not asked again: it would cost again


def test_an_answer_of_another_dimension_than_asked_is_refused(
    upstream: tuple[Upstream, str],
) -> None:
    _, url = upstream
    with pytest.raises(APIError, match=f"dimension {DIM}, asked for 4"):
        client(url).embed("m", ["a"], dimensions=4)


def test_batches_arrive_as_answered_with_a_bounded_number_in_flight(
    upstream: tuple[Upstream, str],
) -> None:
    app, url = upstream
    app.delay = 0.05
    batches = [[f"t{i}-{j}" for j in range(3)] for i in range(10)]
    got = dict(client(url, in_flight=3).embed_batches("m", batches))
    assert sorted(got) == list(range(10))
    for index, batch in enumerate(batches):
        assert np.array_equal(got[index], vectors_for(batch))
    assert app.most_open <= 3 and len(app.requests) == 10


def test_a_failing_batch_is_raised_after_the_ones_answered_before_it(
    upstream: tuple[Upstream, str],
) -> None:
    app, url = upstream
    app.script.extend([ok, lambda body: (401, {}, {"error": {"message": "bad key"}})])
    answers = client(url, in_flight=1).embed_batches("m", [["a"], ["b"], ["c"]])
    seen = [next(answers)[0]]
    with pytest.raises(APIError, match="bad key"):
        next(answers)
    assert seen == [0]  # the first answer was handed over (and can be stored) before the error
    assert len(app.requests) == 2  # nothing was sent after the refusal


def test_a_base_urls_query_is_sent_after_the_path_of_each_request(
    upstream: tuple[Upstream, str],
) -> None:
    """Issue 30: the path was appended after the query (``/v1?api-version=2/embeddings``)."""
    app, url = upstream
    got = client(f"{url}/?api-version=2024-02-01&x=a%20b#fragment").embed("m", ["a"])
    assert np.array_equal(got, vectors_for(["a"]))
    assert app.targets == ["/v1/embeddings?api-version=2024-02-01&x=a%20b"]


def test_the_key_is_in_no_repr_and_the_endpoint_keeps_no_query() -> None:
    c = OpenAIClient("https://api.example.com:8443/openai/v1/?api-version=2", api_key=KEY)
    assert KEY not in repr(c) and "api-version" not in repr(c)
    assert c.endpoint == "https://api.example.com:8443/openai/v1"
    assert endpoint_of("http://[::1]:11434/v1/") == "http://[::1]:11434/v1"
    with pytest.raises(ValueError, match="http"):
        endpoint_of("ftp://host/v1")
