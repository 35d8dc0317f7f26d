"""Properties over arbitrary input (hypothesis): normalization, keys, storage and the wire
keep every text and every bit; NaN and infinity are refused everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from embeddingcache import StorageError
from embeddingcache.keys import NORMALIZATION_POLICIES, key_of, keys_of, normalizer
from embeddingcache.protocol import (
    JSON,
    MSGPACK,
    ProtocolError,
    decode_body,
    decode_vectors,
    encode_body,
    encode_vectors,
)
from embeddingcache.storage import Store

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

# Texts as people send them: any code point but lone surrogates (no UTF-8, refused on input),
# weighted towards the hard ones.
HARD = st.sampled_from(
    [
        "\u0301",  # a combining acute accent
        "\u05d0\u05d1",  # Hebrew, right to left
        "\u202e",  # right-to-left override
        "\U0001f916",  # an emoji outside the BMP
        "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # a ZWJ family
        "\x00",
        "\ufeff",
        " \t\n\u3000",  # whitespace, ideographic included
        "\u0130",  # capital I with dot: lower() spells it with two code points
        "\ufdfa",  # one code point, 18 in NFKC
    ]
)
TEXTS = st.lists(st.one_of(st.text(min_size=1), HARD), min_size=1, max_size=8).map("".join)
HUGE = TEXTS.map(lambda piece: (piece * (100_000 // len(piece) + 1))[:100_000])
VECTOR_ROWS = st.integers(1, 6)
DIMENSIONS = st.integers(1, 48)
# Every finite float32, subnormals, -0.0 and the extremes included.
FINITE = st.floats(width=32, allow_nan=False, allow_infinity=False)


def matrices(elements: st.SearchStrategy[float] = FINITE) -> st.SearchStrategy[np.ndarray]:
    return st.tuples(VECTOR_ROWS, DIMENSIONS).flatmap(
        lambda shape: arrays(np.float32, shape, elements=elements)
    )


@settings(max_examples=300, deadline=None)
@given(st.one_of(TEXTS, HUGE), st.sampled_from(NORMALIZATION_POLICIES))
def test_normalization_is_idempotent(text: str, policy: str) -> None:
    """Normalizing a normalized text changes nothing, whatever the text."""
    norm = normalizer(policy)
    assert norm(norm(text)) == norm(text)


@settings(max_examples=5, deadline=None)
@given(st.lists(st.one_of(TEXTS, HUGE), min_size=1, max_size=40))
def test_keys_are_the_same_in_another_process(texts: list[str]) -> None:
    """A key depends on the text alone: another interpreter computes the same bytes."""
    code = (
        "import json, sys\n"
        "from embeddingcache.keys import keys_of\n"
        "texts = json.loads(sys.stdin.read())\n"
        "print(json.dumps([k.hex() for k in keys_of(texts)]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "random"},
        timeout=60,
        check=True,
    )
    assert json.loads(result.stdout) == [k.hex() for k in keys_of(texts)]
    assert keys_of(texts) == [key_of(t) for t in texts]


_serial = count()


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES)
@given(st.lists(TEXTS, min_size=1, max_size=6, unique=True), st.data())
def test_vectors_and_texts_round_trip_through_storage_bit_for_bit(
    any_store: Store, texts: list[str], data: st.DataObject
) -> None:
    """What goes in comes out: every vector byte for byte (-0.0 and subnormals too), every
    text exactly (on Postgres, a NUL reads U+FFFD in the text copy; the key still finds it)."""
    model = f"model-{next(_serial)}"  # a shard of its own per example: no earlier rows
    vectors = data.draw(arrays(np.float32, (len(texts), data.draw(DIMENSIONS)), elements=FINITE))
    keys = keys_of(texts)
    any_store.put(model, keys, texts, vectors)
    found = any_store.lookup(model, keys)
    assert found.positions.tolist() == list(range(len(texts)))
    assert found.vectors.astype("<f4").tobytes() == vectors.astype("<f4").tobytes()
    place = any_store.layout.text_place()
    with place.engine.connect() as connection:
        rows = dict(connection.execute(place.hashstring.select()).all())
    postgres = place.schema is not None
    for key, text in zip(keys, texts, strict=True):
        assert rows[key] == (text.replace("\x00", "\ufffd") if postgres else text)


@settings(max_examples=200, deadline=None)
@given(matrices(), st.sampled_from([MSGPACK, JSON]))
def test_vectors_round_trip_through_the_wire_bit_for_bit(matrix: np.ndarray, kind: str) -> None:
    """Encoded into a body and decoded from it, in msgpack or JSON, every bit survives."""
    body = encode_body({"embeddings": encode_vectors(matrix, None, kind)}, kind)
    items = decode_body(body, kind)["embeddings"]
    decoded, present = decode_vectors(
        items, matrix.shape[1], kind, field="embeddings", allow_missing=False
    )
    assert present.all()
    assert decoded.astype("<f4").tobytes() == matrix.astype("<f4").tobytes()


def with_one_non_finite(data: st.DataObject) -> np.ndarray:
    matrix = data.draw(matrices())
    row = data.draw(st.integers(0, matrix.shape[0] - 1))
    column = data.draw(st.integers(0, matrix.shape[1] - 1))
    matrix[row, column] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return matrix


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_nan_and_infinity_are_refused_on_the_wire(data: st.DataObject) -> None:
    """A vector holding NaN or infinity anywhere is a 422, in msgpack and in JSON numbers."""
    matrix = with_one_non_finite(data)
    items: list[Any] = encode_vectors(matrix, None, MSGPACK)
    items = [bytes(item) for item in items]
    with pytest.raises(ProtocolError, match="NaN or infinite") as raised:
        decode_vectors(items, matrix.shape[1], MSGPACK, field="embeddings", allow_missing=False)
    assert raised.value.status == 422
    # JSON has no NaN: a client that writes one anyway (Python's json does) is refused too.
    body = json.dumps({"embeddings": matrix.tolist()}).encode()
    with pytest.raises(ProtocolError, match="NaN or infinite"):
        decode_json_vectors(body, matrix.shape[1])


def decode_json_vectors(body: bytes, dimension: int) -> np.ndarray:
    items = decode_body(body, JSON)["embeddings"]
    return decode_vectors(items, dimension, JSON, field="embeddings", allow_missing=False)[0]


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURES)
@given(st.data())
def test_nan_and_infinity_are_never_stored(any_store: Store, data: st.DataObject) -> None:
    """Storing a batch with one non-finite value anywhere fails whole: not one row is stored."""
    matrix = with_one_non_finite(data)
    model = f"refused-{next(_serial)}"
    texts = [f"row {i}" for i in range(matrix.shape[0])]
    with pytest.raises(StorageError, match="NaN or infinite"):
        any_store.put(model, keys_of(texts), texts, matrix)
    assert any_store.info(model) is None
    assert len(any_store.lookup(model, keys_of(texts)).positions) == 0
