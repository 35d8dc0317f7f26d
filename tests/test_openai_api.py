"""`serve` speaks OpenAI's embeddings API: clients nobody here wrote get the cache's vectors."""

from __future__ import annotations

import base64
import json
import threading
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from conftest import EncodeSpy
from hypothesis import given, settings
from hypothesis import strategies as st

from embeddingcache import EmbeddingCache
from embeddingcache.protocol import Limits

TEXTS = ["the first text", "a second one", "and a third"]


@pytest.fixture
def server(start_server: Any) -> Any:
    return start_server()[0]


def client(server: Any, **options: Any) -> openai.OpenAI:
    options.setdefault("api_key", "unused")
    return openai.OpenAI(base_url=server.url + "/v1", max_retries=0, **options)


def test_the_official_client_gets_the_models_vectors_in_base64_by_default(
    server: Any, tiny_model: str, direct_model: Any
) -> None:
    answer = client(server).embeddings.create(model=tiny_model, input=TEXTS)
    got = np.array([item.embedding for item in answer.data], dtype=np.float32)
    np.testing.assert_allclose(got, direct_model.encode(TEXTS), atol=1e-5)
    assert [item.index for item in answer.data] == [0, 1, 2]
    assert answer.model == tiny_model and answer.object == "list"


def test_float_and_base64_and_embed_give_the_same_bits(server: Any, tiny_model: str) -> None:
    from embeddingcache import EmbeddingCache

    floats = client(server).embeddings.create(
        model=tiny_model, input=TEXTS, encoding_format="float"
    )
    raw = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": tiny_model, "input": TEXTS, "encoding_format": "base64"},
    ).json()
    b64 = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in raw["data"]])
    as_floats = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert np.array_equal(b64, as_floats)
    with EmbeddingCache(tiny_model, remote_url=server.url, fallback_providers=("remote",)) as ec:
        assert np.array_equal(ec.get_embeddings(TEXTS), b64)  # through /embed, bit for bit


def test_a_single_string_gets_one_vector(server: Any, tiny_model: str, direct_model: Any) -> None:
    answer = client(server).embeddings.create(model=tiny_model, input="just one")
    assert len(answer.data) == 1
    np.testing.assert_allclose(answer.data[0].embedding, direct_model.encode("just one"), atol=1e-5)


def test_dimensions_gives_the_first_components_at_unit_length_and_stores_nothing_new(
    start_server: Any, tiny_model: str, direct_model: Any
) -> None:
    server, backend = start_server()
    full = direct_model.encode(TEXTS)
    answer = client(server).embeddings.create(model=tiny_model, input=TEXTS, dimensions=8)
    got = np.array([d.embedding for d in answer.data])
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    again = client(server).embeddings.create(model=tiny_model, input=TEXTS)
    np.testing.assert_allclose([d.embedding for d in again.data], full, atol=1e-5)
    assert backend.cache.stats["computed"] == 3  # the full vectors, once


def test_usage_counts_every_inputs_tokens_and_headers_say_what_the_cache_served(
    server: Any, tiny_model: str, direct_model: Any
) -> None:
    tokenizer = direct_model.tokenizer
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    body = {"model": tiny_model, "input": TEXTS[:2]}
    first = httpx.post(server.url + "/v1/embeddings", json=body)
    body["input"] = TEXTS
    second = httpx.post(server.url + "/v1/embeddings", json=body)
    assert second.json()["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert first.headers["x-embeddingcache-hits"] == "0"
    assert first.headers["x-embeddingcache-computed"] == "2"
    assert second.headers["x-embeddingcache-hits"] == "2"
    assert second.headers["x-embeddingcache-computed"] == "1"
    assert second.headers["x-embeddingcache-model"] == tiny_model


def test_input_type_picks_the_models_query_or_document_prompt(
    start_server: Any, prompted_model: str, direct_model: Any
) -> None:
    server, _ = start_server(models=[prompted_model])
    c = client(server)

    def vector(**extra: Any) -> np.ndarray:
        answer = c.embeddings.create(model=prompted_model, input=["cats"], extra_body=extra)
        return np.array(answer.data[0].embedding)

    np.testing.assert_allclose(
        vector(input_type="query"), direct_model.encode("query: cats"), atol=1e-5
    )
    np.testing.assert_allclose(
        vector(input_type="passage"), direct_model.encode("passage: cats"), atol=1e-5
    )
    np.testing.assert_allclose(vector(), direct_model.encode("passage: cats"), atol=1e-5)  # default
    with pytest.raises(openai.BadRequestError, match="input_type"):
        vector(input_type="code")


def test_models_are_listed_as_openai_lists_them(start_server: Any, tiny_model: str) -> None:
    server, _ = start_server(token="secret")
    c = client(server, api_key="secret")
    listed = c.models.list()
    assert [m.id for m in listed.data] == [tiny_model]
    assert listed.data[0].object == "model" and listed.data[0].owned_by == "embeddingcache"
    assert c.models.retrieve(tiny_model).id == tiny_model
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"input": ["x"]}, "'model' is required"),
        ({"model": "M", "input": []}, "'input' is empty"),
        ({"model": "M", "input": ["ok", "  "]}, "input[1] is empty or only whitespace"),
        ({"model": "M", "input": ["ok", 3]}, "input[1] must be a string"),
        ({"model": "M", "input": [[1, 2, 3]]}, "token arrays are not accepted"),
        ({"model": "M", "input": [1, 2, 3]}, "token arrays are not accepted"),
        ({"model": "M", "input": ["x"], "encoding_format": "int8"}, "encoding_format"),
        ({"model": "M", "input": ["x"], "dimensions": 0}, "dimensions must be a positive"),
        # Unhashable: a 500 once (found by test_mutated_bodies_never_get_a_5xx).
        ({"model": "M", "input": ["x"], "input_type": []}, "input_type must be one of"),
        ({"model": "M", "input": ["x"], "input_type": {}}, "input_type must be one of"),
        ({"model": "M", "input": ["x"], "truncate": "yes"}, "truncate must be true or false"),
    ],
)
def test_bad_requests_are_400s_in_openais_shape_naming_what_is_wrong(
    server: Any, tiny_model: str, body: dict[str, Any], says: str
) -> None:
    if body.get("model") == "M":
        body["model"] = tiny_model
    with pytest.raises(openai.BadRequestError) as failed:
        # The client's own request path (it checks no field itself), its own exception class.
        client(server).post("/embeddings", body=body, cast_to=object)
    assert says in failed.value.message
    error = failed.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_a_missing_or_wrong_key_is_a_401(start_server: Any, tiny_model: str) -> None:
    server, _ = start_server(token="secret")
    with pytest.raises(openai.AuthenticationError, match="bearer token"):
        client(server, api_key="wrong").embeddings.create(model=tiny_model, input="x")
    assert client(server, api_key="secret").embeddings.create(model=tiny_model, input="x").data


def test_an_unknown_model_is_a_404_model_not_found(server: Any) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist on this server") as failed:
        client(server).embeddings.create(model="text-embedding-3-small", input="x")
    assert failed.value.code == "model_not_found"


def test_limits_give_413_and_400_and_allow_openais_2048_inputs(
    start_server: Any, tiny_model: str
) -> None:
    server, _ = start_server()
    many = [f"text number {i}" for i in range(2048)]
    assert len(client(server).embeddings.create(model=tiny_model, input=many).data) == 2048
    small, _ = start_server(limits=Limits(max_texts=4, max_body_bytes=2000))
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        client(small).embeddings.create(model=tiny_model, input=["a"] * 5)
    with pytest.raises(openai.APIStatusError) as failed:
        client(small).embeddings.create(model=tiny_model, input=["x" * 3000])
    assert failed.value.status_code == 413


def test_a_model_that_fails_is_a_503(
    start_server: Any, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sentence_transformers import SentenceTransformer

    server, _ = start_server()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the accelerator fell over")  # the fault to inject

    monkeypatch.setattr(SentenceTransformer, "encode", broken)
    with pytest.raises(openai.InternalServerError, match="model failed") as failed:
        client(server).embeddings.create(model=tiny_model, input="new text")
    assert failed.value.status_code == 503


def test_concurrent_requests_for_the_same_new_texts_compute_each_once(
    server: Any, tiny_model: str, encode_spy: EncodeSpy
) -> None:
    texts = [f"shared new text {i}" for i in range(40)]
    barrier = threading.Barrier(6)
    answers: list[Any] = []

    def ask(path: str) -> None:
        barrier.wait()
        if path == "/v1/embeddings":
            answers.append(
                httpx.post(server.url + path, json={"model": tiny_model, "input": texts})
            )
        else:
            answers.append(httpx.post(server.url + path, json={"texts": texts}))

    threads = [threading.Thread(target=ask, args=(p,)) for p in ["/v1/embeddings", "/embed"] * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200] * 6
    assert sorted(encode_spy.texts) == sorted(texts)  # each text encoded once, by one request


def test_langchain_openai_embeddings_work_against_the_server(
    server: Any, tiny_model: str, direct_model: Any
) -> None:
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model=tiny_model,
        base_url=server.url + "/v1",
        api_key="unused",  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    np.testing.assert_allclose(
        embeddings.embed_documents(TEXTS), direct_model.encode(TEXTS), atol=1e-5
    )
    np.testing.assert_allclose(
        embeddings.embed_query("a query"), direct_model.encode("a query"), atol=1e-5
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


# Text UTF-8 cannot encode: lone surrogates (what JavaScript's slice leaves of an emoji).
unencodable = st.text(
    alphabet=st.characters(categories=["Cs", "Ll", "Zs"]), min_size=1, max_size=12
)


def test_mutated_bodies_never_get_a_5xx(start_server: Any, tiny_model: str) -> None:
    server, _ = start_server(limits=Limits(max_texts=8, max_text_chars=200))
    valid = st.fixed_dictionaries(
        {
            "model": st.just(tiny_model),
            "input": st.lists(
                st.from_regex(r"[a-z]{1,12}", fullmatch=True), min_size=1, max_size=5
            ),
        }
    )
    fields = st.fixed_dictionaries(
        {},
        optional={
            "model": st.sampled_from([tiny_model, "other"]) | json_values,
            "input": st.lists(st.text(max_size=30) | unencodable, max_size=10) | json_values,
            "truncate": json_values,
            "encoding_format": st.sampled_from(["float", "base64", "x"]) | json_values,
            "dimensions": st.integers(-2, 64) | json_values,
            "input_type": st.sampled_from(["query", "document", "x"]) | json_values,
            "user": json_values,
        },
    )
    answered: list[int] = []

    @settings(max_examples=150, deadline=None)
    @given(body=valid | fields | json_values)
    def throw(body: Any) -> None:
        response = post_json(server.url + "/v1/embeddings", body)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert response.json()["error"]["message"]
        answered.append(response.status_code)

    throw()
    assert any(s == 200 for s in answered) and any(s >= 400 for s in answered)
    raw = httpx.post(server.url + "/v1/embeddings", content=b"{not json", timeout=30)
    assert raw.status_code == 400 and raw.json()["error"]["message"]


# -- production: no 5xx for any text, truncation, OpenAI's shape for every error -------------


def post_json(url: str, body: Any) -> httpx.Response:
    """POST ``body`` as JSON that spells a lone surrogate as ``\\ud83d``, as JavaScript's
    ``JSON.stringify`` does (httpx's own encoder would refuse to send it)."""
    return httpx.post(
        url, content=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize("bad", ["cut \ud83d", "\ude00 half", "\udfff"])
def test_a_lone_surrogate_is_a_400_naming_the_input_on_v1_and_a_422_on_embed(
    server: Any, tiny_model: str, bad: str
) -> None:
    """Half an emoji (what JavaScript's slice leaves) is refused as the client's mistake on
    both routes, never a 500 that clients retry."""
    answer = post_json(server.url + "/v1/embeddings", {"model": tiny_model, "input": ["ok", bad]})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "input" and error["type"] == "invalid_request_error"
    assert error["message"].startswith("input[1] is not valid Unicode")
    ours = post_json(server.url + "/embed", {"texts": ["ok", bad]})
    assert ours.status_code == 422 and "texts[1] is not valid Unicode" in ours.json()["detail"]


LONG = "x" * 100  # more tokens than the tiny model takes


def test_a_too_long_input_is_a_400_that_names_both_ways_to_truncate(
    server: Any, tiny_model: str
) -> None:
    """OpenAI answers an over-long input with 400 (BadRequestError in its clients); ours
    says which input, by how much, and the two switches that would embed it."""
    with pytest.raises(openai.BadRequestError) as failed:
        client(server).embeddings.create(model=tiny_model, input=["short", LONG])
    error = failed.value.body
    assert isinstance(error, dict) and error["param"] == "input"
    assert error["code"] == "context_length_exceeded"
    message = error["message"]
    assert message.startswith("input[1] is ") and "tokens long, more than the" in message
    assert '"truncate": true' in message and "--truncate" in message


def test_truncate_in_the_request_gives_the_vector_get_embeddings_truncate_gives(
    server: Any, tiny_model: str, tmp_path: Any
) -> None:
    """The extension field ``truncate`` cuts an over-long input as the library does."""
    answer = client(server).embeddings.create(
        model=tiny_model, input=["short", LONG], extra_body={"truncate": True}
    )
    served = np.array(answer.data[1].embedding, dtype=np.float32)
    with EmbeddingCache(tiny_model, cache_dir=tmp_path, device="cpu", remote_url=False) as cache:
        expected = cache.get_embeddings([LONG], truncate=True)[0]
    np.testing.assert_array_equal(served, expected)


def test_serve_truncate_is_the_default_a_request_can_turn_off(
    start_server: Any, tiny_model: str
) -> None:
    """``Backend(truncate=True)`` (``serve --truncate``) cuts what a request does not say
    otherwise; ``"truncate": false`` still gets the 400."""
    server, _ = start_server(truncate=True)
    answer = httpx.post(server.url + "/v1/embeddings", json={"model": tiny_model, "input": LONG})
    assert answer.status_code == 200 and len(answer.json()["data"]) == 1
    refused = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": tiny_model, "input": "y" * 100, "truncate": False},
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nope", 404),
        ("POST", "/v1", 404),
        ("POST", "/v1/chat/completions", 404),
        ("GET", "/v1/embeddings", 405),
        ("DELETE", "/v1/models", 405),
    ],
)
def test_every_error_under_v1_is_in_openais_shape(
    server: Any, method: str, path: str, status: int
) -> None:
    """Unknown paths and wrong methods under /v1 answer as OpenAI does, so that its clients
    show the message rather than "(no body)"."""
    answer = httpx.request(method, server.url + path)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and path in error["message"]


def test_a_trailing_slash_is_served_not_redirected(server: Any, tiny_model: str) -> None:
    """``/v1/embeddings/`` is ``/v1/embeddings``: a 307 would make many clients fail a POST."""
    answer = httpx.post(
        server.url + "/v1/embeddings/", json={"model": tiny_model, "input": "hello"}
    )
    assert answer.status_code == 200 and len(answer.json()["data"]) == 1
    assert httpx.get(server.url + "/v1/models/").json()["object"] == "list"


@pytest.mark.parametrize("dimension", [1, 2, 3, 64, 383, 385])
def test_an_answer_decodes_to_the_exact_vectors_whatever_the_dimension(dimension: int) -> None:
    """Base64 cut from one encoding of all rows, and floats split from one dump, give each
    row's own bits, with the padding a row of any length needs."""
    from embeddingcache import openai_wire

    rows = np.random.default_rng(dimension).standard_normal((12, dimension)).astype(np.float32)
    rows[0, 0] = np.float32(1e-45)  # the smallest subnormal survives both
    for encoding in ("base64", "float"):
        answer = json.loads(openai_wire.response_body(rows, "m", 7, encoding))
        assert [item["index"] for item in answer["data"]] == list(range(12))
        got = [item["embedding"] for item in answer["data"]]
        if encoding == "base64":
            assert got == [base64.b64encode(row.tobytes()).decode() for row in rows]
        else:
            np.testing.assert_array_equal(np.asarray(got, dtype=np.float32), rows)
