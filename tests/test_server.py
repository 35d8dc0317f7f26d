"""The backend, spoken to over HTTP as any client would, on a real uvicorn server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embeddingcache.protocol import Limits

TEXTS = ["the first text", "a second one", "and a third"]
MSGPACK = {"Content-Type": "application/msgpack"}


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{url}/embed",
        content=msgpack.packb(body),
        headers={**MSGPACK, **(headers or {})},
        timeout=30,
    )


def vectors_of(answer: dict[str, Any]) -> np.ndarray:
    return np.stack([np.frombuffer(v, dtype="<f4") for v in answer["embeddings"]])


@pytest.fixture
def server(start_server: Any) -> Any:
    return start_server()[0]


def test_embed_answers_the_models_vectors_as_float32_bytes(server: Any, direct_model: Any) -> None:
    response = post(server.url, {"texts": TEXTS})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/msgpack"
    answer = msgpack.unpackb(response.content)
    assert answer["dimensions"] == 32 and answer["cache_hits"] == [False] * 3
    assert all(len(v) == 4 * 32 for v in answer["embeddings"])
    np.testing.assert_array_equal(vectors_of(answer), direct_model.encode(TEXTS))


def test_second_request_is_answered_from_the_cache(start_server: Any) -> None:
    server, backend = start_server()
    first = msgpack.unpackb(post(server.url, {"texts": TEXTS}).content)
    second = msgpack.unpackb(post(server.url, {"texts": [*TEXTS, "new"]}).content)
    assert second["cache_hits"] == [True, True, True, False]
    np.testing.assert_array_equal(vectors_of(second)[:3], vectors_of(first))
    assert backend.stats()["computed"] == 4


def test_json_requests_get_float_lists_equal_to_the_msgpack_vectors(server: Any) -> None:
    response = httpx.post(f"{server.url}/embed", json={"texts": TEXTS}, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    from_json = np.asarray(answer["embeddings"], dtype=np.float32)
    from_msgpack = vectors_of(msgpack.unpackb(post(server.url, {"texts": TEXTS}).content))
    np.testing.assert_array_equal(from_json, from_msgpack)


def test_lookup_only_returns_null_for_misses_and_computes_nothing(start_server: Any) -> None:
    server, backend = start_server()
    post(server.url, {"texts": TEXTS[:1]})
    answer = msgpack.unpackb(post(server.url, {"texts": TEXTS, "lookup_only": True}).content)
    assert answer["cache_hits"] == [True, False, False]
    assert answer["embeddings"][1:] == [None, None]
    assert len(answer["embeddings"][0]) == 4 * 32
    assert backend.stats()["computed"] == 1


def test_normalized_texts_are_embedded_as_sent(server: Any, direct_model: Any) -> None:
    stripped = msgpack.unpackb(post(server.url, {"texts": ["  padded  "]}).content)
    as_sent = msgpack.unpackb(
        post(server.url, {"texts": ["  padded  "], "normalized": True}).content
    )
    np.testing.assert_array_equal(vectors_of(stripped), direct_model.encode(["padded"]))
    np.testing.assert_array_equal(vectors_of(as_sent), direct_model.encode(["  padded  "]))


def test_a_prompt_is_part_of_the_embedded_string(server: Any, direct_model: Any) -> None:
    answer = msgpack.unpackb(post(server.url, {"texts": ["hello"], "prompt": "query: "}).content)
    np.testing.assert_array_equal(
        vectors_of(answer), direct_model.encode(["hello"], prompt="query: ")
    )


def test_health_models_and_stats_describe_the_server(start_server: Any, tiny_model: str) -> None:
    server, _ = start_server(allow_push=True)
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    models = httpx.get(f"{server.url}/models").json()
    assert models["default"] == tiny_model
    assert models["models"][0]["name"] == tiny_model
    assert models["models"][0]["dimensions"] == 32
    assert models["limits"]["max_texts"] == Limits().max_texts
    assert models["push"] is True
    post(server.url, {"texts": TEXTS})
    post(server.url, {"texts": TEXTS})
    stats = httpx.get(f"{server.url}/stats").json()
    assert stats["requests"] == 2 and stats["texts"] == 6
    assert stats["hits"] == 3 and stats["computed"] == 3


def test_a_token_is_required_when_the_server_has_one(start_server: Any) -> None:
    server, _ = start_server(token="s3cret")
    for path in ("/models", "/stats"):
        assert httpx.get(f"{server.url}{path}").status_code == 401
    refused = post(server.url, {"texts": TEXTS})
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert "bearer token" in refused.json()["detail"]
    assert post(server.url, {"texts": TEXTS}, {"Authorization": "Bearer wrong"}).status_code == 401
    assert post(server.url, {"texts": TEXTS}, {"Authorization": "s3cret"}).status_code == 401
    assert post(server.url, {"texts": TEXTS}, {"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(f"{server.url}/healthz").status_code == 200


BAD_REQUESTS = [
    # (what is wrong, content type, body, status, words of the answer)
    ("malformed msgpack", "application/msgpack", b"\xc1\xc1\xc1", 400, "malformed msgpack"),
    (
        "truncated msgpack",
        "application/msgpack",
        msgpack.packb({"texts": ["ab"]})[:-2],
        400,
        "malformed msgpack",
    ),
    ("malformed JSON", "application/json", b'{"texts": [', 400, "malformed JSON"),
    ("wrong content type", "text/plain", b"hello", 415, "unsupported content type"),
    ("no content type", "", b"hello", 415, "unsupported content type"),
    ("not a map", "application/json", b'["a"]', 422, "map of fields"),
    ("no texts", "application/json", b"{}", 422, "missing field 'texts'"),
    ("texts not a list", "application/json", b'{"texts": "abc"}', 422, "must be a list"),
    ("empty list", "application/json", b'{"texts": []}', 422, "texts is empty"),
    ("a number", "application/json", b'{"texts": ["a", 3]}', 422, "is of type int, not str"),
    ("a null", "application/json", b'{"texts": [null]}', 422, "texts[0] is None"),
    ("blank text", "application/json", b'{"texts": [" "]}', 422, "texts[0] is empty"),
    ("lone surrogate", "application/json", b'{"texts": ["\\ud800"]}', 422, "texts[0]"),
    (
        "unknown model",
        "application/json",
        b'{"texts": ["a"], "model": "nope"}',
        422,
        "this server serves: ",
    ),
    (
        "model not a string",
        "application/json",
        b'{"texts": ["a"], "model": 5}',
        422,
        "model must be",
    ),
    (
        "flag not a bool",
        "application/json",
        b'{"texts": ["a"], "lookup_only": "yes"}',
        422,
        "lookup_only must be true or false",
    ),
    (
        "prompt not a string",
        "application/json",
        b'{"texts": ["a"], "prompt": 1}',
        422,
        "prompt must be",
    ),
]


@pytest.mark.parametrize(
    ("content_type", "body", "status", "words"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_gets_a_4xx_that_says_what_was_wrong(
    server: Any, content_type: str, body: bytes, status: int, words: str
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = httpx.post(f"{server.url}/embed", content=body, headers=headers, timeout=30)
    assert response.status_code == status
    assert words in response.json()["detail"]


def test_limits_refuse_too_many_texts_too_long_texts_and_big_bodies(start_server: Any) -> None:
    server, backend = start_server(
        limits=Limits(max_texts=3, max_text_chars=10, max_body_bytes=1000)
    )
    too_many = post(server.url, {"texts": ["a", "b", "c", "d"]})
    assert too_many.status_code == 422 and "at most 3" in too_many.json()["detail"]
    too_long = post(server.url, {"texts": ["short", "x" * 11]})
    assert too_long.status_code == 422
    assert "texts[1] is 11 characters long" in too_long.json()["detail"]
    declared = post(server.url, {"texts": ["a"], "pad": "x" * 2000})
    assert declared.status_code == 413 and "1000 bytes" in declared.json()["detail"]

    def trickle() -> Iterator[bytes]:  # chunked: no Content-Length to check up front
        yield msgpack.packb({"texts": ["a"], "pad": "x" * 2000})

    streamed = httpx.post(f"{server.url}/embed", content=trickle(), headers=MSGPACK)
    assert streamed.status_code == 413
    assert post(server.url, {"texts": ["fine"]}).status_code == 200
    assert backend.stats()["rejected"] == 3 + 1


def test_a_text_longer_than_the_model_takes_is_a_422_naming_it(server: Any) -> None:
    response = post(server.url, {"texts": ["short", "x" * 100]})
    assert response.status_code == 422
    assert response.json()["error"] == "too_many_tokens" and response.json()["index"] == 1
    truncated = post(server.url, {"texts": ["short", "x" * 100], "truncate": True})
    assert truncated.status_code == 200


def push(url: str, texts: list[str], vectors: Any, **fields: Any) -> httpx.Response:
    body = {"texts": texts, "embeddings": vectors, **fields}
    return httpx.post(f"{url}/push", content=msgpack.packb(body), headers=MSGPACK, timeout=30)


def f32(*rows: list[float]) -> list[bytes]:
    return [np.asarray(row, dtype="<f4").tobytes() for row in rows]


def test_push_is_refused_unless_the_server_allows_it(start_server: Any) -> None:
    server, _ = start_server()
    response = push(server.url, ["pushed"], f32([0.5] * 32))
    assert response.status_code == 403 and "--allow-push" in response.json()["detail"]
    answer = msgpack.unpackb(post(server.url, {"texts": ["pushed"], "lookup_only": True}).content)
    assert answer["cache_hits"] == [False]


def test_pushed_vectors_are_served_and_never_replace_stored_ones(start_server: Any) -> None:
    server, backend = start_server(allow_push=True)
    original = vectors_of(msgpack.unpackb(post(server.url, {"texts": ["stored"]}).content))
    response = push(server.url, ["pushed", "stored"], f32([0.5] * 32, [9.0] * 32))
    assert response.status_code == 200 and msgpack.unpackb(response.content)["accepted"] == 1
    answer = msgpack.unpackb(
        post(server.url, {"texts": ["pushed", "stored"], "lookup_only": True}).content
    )
    assert answer["cache_hits"] == [True, True]
    np.testing.assert_array_equal(vectors_of(answer), np.stack([[0.5] * 32, original[0]]))
    assert backend.stats()["computed"] == 1


@pytest.mark.parametrize(
    ("vectors", "words"),
    [
        (f32([0.5] * 31), "embeddings[0] is 124 bytes"),
        (f32([float("nan")] * 32), "NaN or infinite"),
        (f32([float("inf")] * 32), "NaN or infinite"),
        ([[0.5] * 32], "must be float32 bytes"),
        (f32([0.5] * 32, [0.5] * 32), "one per text"),
    ],
    ids=["wrong dimension", "NaN", "infinity", "floats in msgpack", "count"],
)
def test_pushed_vectors_of_the_wrong_shape_or_not_finite_are_refused(
    start_server: Any, vectors: Any, words: str
) -> None:
    server, backend = start_server(allow_push=True)
    response = push(server.url, ["pushed"], vectors)
    assert response.status_code == 422 and words in response.json()["detail"]
    assert backend.stats()["accepted_pushes"] == 0


def test_json_push_takes_float_lists(start_server: Any) -> None:
    server, _ = start_server(allow_push=True)
    body = {"texts": ["pushed"], "embeddings": [[0.25] * 32]}
    assert httpx.post(f"{server.url}/push", json=body).status_code == 200
    bad = {"texts": ["pushed"], "embeddings": [[0.25] * 31 + ["x"]]}
    response = httpx.post(f"{server.url}/push", json=bad)
    assert response.status_code == 422 and "list of 32 numbers" in response.json()["detail"]
    for huge, words in ((10**400, "out of range"), (1e300, "NaN or infinite")):
        body = {"texts": ["pushed"], "embeddings": [[huge] + [0.25] * 31]}
        response = httpx.post(f"{server.url}/push", json=body)
        assert response.status_code == 422 and words in response.json()["detail"]


def test_unknown_paths_and_methods_are_4xx_in_our_shape_naming_them(server: Any) -> None:
    """Outside /v1, a 404 and a 405 say what was asked, in the shape of every other error."""
    missing = httpx.get(f"{server.url}/nope")
    assert missing.status_code == 404
    assert missing.json() == {
        "detail": "no such route: GET /nope (see docs/protocol.md)",
        "error": "unknown_url",
    }
    wrong = httpx.get(f"{server.url}/embed")
    assert wrong.status_code == 405
    assert wrong.json()["error"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST" and "POST" in wrong.json()["detail"]


# -- hostile bodies --------------------------------------------------------------------------


VALID = [
    {"texts": ["hello", "world"]},
    {"texts": ["hello"], "lookup_only": True, "normalized": True, "prompt": "q: "},
    {"texts": ["pushed"], "embeddings": [np.full(32, 0.5, dtype="<f4").tobytes()]},
]
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=140),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Text UTF-8 cannot encode: lone surrogates (what JavaScript's slice leaves of an emoji).
unencodable = st.text(
    alphabet=st.characters(categories=["Cs", "Ll", "Zs"]), min_size=1, max_size=12
)
near_valid = st.fixed_dictionaries(
    {},
    optional={
        "texts": st.lists(st.text(max_size=30) | unencodable, max_size=4) | values,
        "model": st.sampled_from([None, "nope", ""]) | values,
        "normalized": values,
        "lookup_only": values,
        "truncate": values,
        "prompt": values,
        "embeddings": st.lists(st.binary(min_size=128, max_size=128), max_size=3) | values,
    },
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    body = bytearray(msgpack.packb(draw(st.sampled_from(VALID))))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(body) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            body[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del body[at:]
            if not body:
                break
        else:
            body[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(body)


def encoded(kind: str, value: Any) -> bytes:
    if kind == "json":
        try:
            return json.dumps(value).encode()
        except (TypeError, ValueError):
            return b"{"
    try:
        # A lone surrogate goes as the bytes Python would give it: not UTF-8 at all.
        return msgpack.packb(value, unicode_errors="surrogatepass")
    except OverflowError:  # an int beyond 64 bits: JSON can carry it, msgpack cannot
        return b"\xc1"


bodies = (
    st.binary(max_size=300)
    | mutated()
    | st.builds(encoded, st.sampled_from(["msgpack", "json"]), near_valid | values)
)
content_types = st.sampled_from(
    [
        "application/msgpack",
        "application/json",
        "application/x-msgpack; charset=binary",
        "text/plain",
        "",
        "application/msgpack, application/json",
    ]
)


@pytest.fixture
def push_server(start_server: Any) -> Any:
    return start_server(allow_push=True, limits=Limits(max_texts=8, max_text_chars=200))[0]


def test_malformed_and_mutated_bodies_never_get_a_5xx_nor_stop_the_server(
    push_server: Any,
) -> None:
    answered: list[int] = []

    @settings(max_examples=300, deadline=None)
    @given(body=bodies, content_type=content_types, path=st.sampled_from(["/embed", "/push"]))
    def throw(body: bytes, content_type: str, path: str) -> None:
        headers = {"Content-Type": content_type} if content_type else {}
        response = httpx.post(f"{push_server.url}{path}", content=body, headers=headers, timeout=30)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert response.json()["detail"]
        answered.append(response.status_code)

    throw()
    assert len(answered) >= 100 and any(status >= 400 for status in answered)
    assert httpx.get(f"{push_server.url}/healthz").status_code == 200
    assert post(push_server.url, {"texts": ["still here"]}).status_code == 200


def test_lookup_only_in_json_answers_null_for_misses(server: Any) -> None:
    post(server.url, {"texts": ["known"]})
    response = httpx.post(
        f"{server.url}/embed", json={"texts": ["known", "unknown"], "lookup_only": True}
    )
    answer = response.json()
    assert answer["cache_hits"] == [True, False]
    assert len(answer["embeddings"][0]) == 32 and answer["embeddings"][1] is None


def test_concurrent_requests_keep_truncation_apart(server: Any, direct_model: Any) -> None:
    """The length check and the encode of one request never see another's tokenizer
    settings: long texts without truncate are always refused, and nothing fails."""
    from concurrent.futures import ThreadPoolExecutor

    long_text = "x" * 100

    def ask(i: int) -> tuple[int, int, bool]:
        truncate = i % 2 == 0
        text = f"{long_text} {i}" if i % 3 else f"short {i}"
        response = post(server.url, {"texts": [text], "truncate": truncate})
        return i, response.status_code, truncate

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(ask, range(120)))
    for i, status, truncate in answers:
        long = i % 3 != 0
        assert status == (422 if long and not truncate else 200), (i, status)
    short = msgpack.unpackb(post(server.url, {"texts": ["short 3"]}).content)
    np.testing.assert_array_equal(vectors_of(short), direct_model.encode(["short 3"]))


def test_a_body_that_never_arrives_gets_408_and_blocks_no_one(start_server: Any) -> None:
    import socket

    server, _ = start_server(limits=Limits(body_timeout_s=1.0))
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as slow:
        slow.sendall(
            b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
            b"Content-Length: 100\r\n\r\n\x81\xa5texts"
        )
        assert post(server.url, {"texts": ["meanwhile"]}).status_code == 200
        answer = slow.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer


def test_a_body_announcing_millions_of_items_is_refused_before_building_them(
    server: Any,
) -> None:
    announced = b"\x81\xa5texts\xdd\x03\x93\x87\x00" + b"\x90" * 1000  # an array of 60M
    response = httpx.post(f"{server.url}/embed", content=announced, headers=MSGPACK)
    assert response.status_code == 400 and "malformed msgpack" in response.json()["detail"]


def test_a_msgpack_body_of_100000_texts_gets_the_documented_422_too_many_texts(
    server: Any,
) -> None:
    """Issue 30: msgpack's own array bound answered 400 "exceeds max_array_len(65536)"."""
    response = post(server.url, {"texts": [f"t{i}" for i in range(100_000)]})
    assert response.status_code == 422
    assert response.json() == {
        "detail": "100000 texts in one request; this server takes at most 4096",
        "error": "too_many_texts",
    }


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "latin-1"])
def test_a_json_body_not_in_utf8_is_a_400_on_both_routes_never_a_5xx(
    start_server: Any, tiny_model: str, encoding: str
) -> None:
    """JSON travels as UTF-8 (RFC 8259): others are malformed, though json.loads reads UTF-16/32."""
    server, _ = start_server()
    for path, body in (
        ("/embed", {"texts": ["café"]}),
        ("/v1/embeddings", {"input": ["café"], "model": tiny_model}),
    ):
        content = json.dumps(body, ensure_ascii=False).encode(encoding)
        response = httpx.post(
            f"{server.url}{path}",
            content=content,
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 400, (path, response.text)
        said = response.json()
        message = said["detail"] if path == "/embed" else said["error"]["message"]
        assert message.startswith("malformed JSON body")
    assert httpx.get(f"{server.url}/stats").json()["computed"] == 0


def test_a_json_body_in_utf8_with_a_byte_order_mark_is_read(server: Any) -> None:
    """RFC 8259 lets a reader ignore a UTF-8 byte order mark; the server does."""
    content = json.dumps({"texts": ["café"]}, ensure_ascii=False).encode("utf-8-sig")
    response = httpx.post(
        f"{server.url}/embed", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200 and len(response.json()["embeddings"]) == 1


# -- hostile paths, headers and slow clients ---------------------------------------------------

header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=200,
)
header_names = st.sampled_from(
    [
        "Content-Type",
        "Content-Length",
        "Content-Encoding",
        "Transfer-Encoding",
        "Authorization",
        "Accept",
        "Expect",
        "X-Anything",
    ]
)
paths = st.one_of(
    st.sampled_from(["/embed", "/push", "/models", "/stats", "/healthz", "/", "//embed"]),
    st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#?"),
        max_size=60,
    ).map(lambda p: "/" + p),
)


def test_random_paths_methods_and_headers_never_get_a_5xx_nor_stop_the_server(
    push_server: Any,
) -> None:
    """Any method, path and header values (Latin-1, as HTTP carries them) get a 4xx at worst."""
    import socket

    host, port = push_server.url.removeprefix("http://").split(":")
    answered: list[int] = []

    @settings(max_examples=200, deadline=None)
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
        path=paths,
        headers=st.dictionaries(header_names, header_values, max_size=4),
        body=bodies,
    )
    def throw(method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            lines.append(f"Content-Length: {len(body)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(request)
            connection.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        # uvicorn may close a connection whose request it cannot parse without a word.
        if answer:
            status = int(answer.split(b" ", 2)[1])
            assert status < 500, answer[:300]
            answered.append(status)

    throw()
    assert len(answered) >= 100
    assert httpx.get(f"{push_server.url}/healthz").status_code == 200
    assert post(push_server.url, {"texts": ["still here"]}).status_code == 200


def test_a_client_sending_its_body_byte_by_byte_blocks_no_one(
    start_server: Any, direct_model: Any
) -> None:
    """A body trickling in one byte at a time is read without holding up other clients, and
    is answered correctly when it is complete."""
    import socket
    import threading
    import time

    server, _ = start_server(limits=Limits(body_timeout_s=30.0))
    host, port = server.url.removeprefix("http://").split(":")
    text = "trickled in, " * 5  # a body of 80 bytes: 8 s at one byte per 0.1 s
    body = msgpack.packb({"texts": [text]})
    answer: list[bytes] = []

    def trickle() -> None:
        with socket.create_connection((host, int(port)), timeout=60) as slow:
            slow.sendall(
                b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            for byte in body:
                slow.sendall(bytes([byte]))
                time.sleep(0.1)
            while chunk := slow.recv(65536):
                answer.append(chunk)

    sender = threading.Thread(target=trickle)
    sender.start()
    served = 0
    while sender.is_alive() and served < 20:
        assert post(server.url, {"texts": [f"meanwhile {served}"]}).status_code == 200
        served += 1
    sender.join(timeout=60)
    assert served == 20  # all while the slow body was still arriving
    response = b"".join(answer)
    assert response.startswith(b"HTTP/1.1 200")
    vectors = vectors_of(msgpack.unpackb(response.split(b"\r\n\r\n", 1)[1]))
    np.testing.assert_array_equal(vectors, direct_model.encode([text.strip()]))
