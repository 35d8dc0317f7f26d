"""An engine is described by data: a new one is a class and a `register` line, and the
pipeline asks no engine what it is."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embeddingcache import EmbeddingCache, engines
from embeddingcache.errors import ProviderError, TextTooLongError
from embeddingcache.keys import keys_of
from embeddingcache.models import ModelSpec

PACKAGE = Path(__file__).resolve().parent.parent / "embeddingcache"
TEXTS = ["a first text", "a second text", "too long " * 20, "a first text"]


class ToyEngine(engines.Engine):
    """A toy API: bills by the token, refuses long texts before anything is sent, and
    counts what it computed. Nothing in the pipeline knows it."""

    kind = "toy"
    bills_tokens = True
    limits = engines.Limits(batch_inputs=2, token_budget=1000, in_flight=2)

    def __init__(self) -> None:
        self.computed: list[str] = []
        self.checked: list[str] = []

    def embed(
        self, spec: ModelSpec, texts: Sequence[str], *, prompt: str, options: Any
    ) -> np.ndarray:
        self.computed.extend(texts)
        digests = b"".join(keys_of([prompt + t for t in texts]))
        return np.frombuffer(digests, np.uint8).reshape(len(texts), 64).astype(np.float32)

    def dimension(self, spec: ModelSpec) -> int:
        return 64

    def count_tokens(self, spec: ModelSpec, texts: Sequence[str]) -> list[int]:
        return [len(text.split()) for text in texts]

    def check_inputs(self, spec: ModelSpec, texts: Sequence[str], *, truncate: bool) -> None:
        self.checked.extend(texts)
        for i, text in enumerate(texts):
            if len(text) > 100 and not truncate:
                raise TextTooLongError(f"{len(text)} characters, the toy takes 100", index=i)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> ToyEngine:
    engine = ToyEngine()
    monkeypatch.setitem(engines.REGISTRY, "toy", lambda settings: engine)
    return engine


def _vectors(cache: EmbeddingCache, spec: ModelSpec, texts: list[str]) -> Any:
    pipeline = cache.pipeline
    return pipeline.vectors(pipeline.prepare(spec, texts, ""))


def test_a_new_engine_is_a_class_and_a_registry_line(toy: ToyEngine, cache_dir: Path) -> None:
    """Registered from a test file, the toy computes each distinct text once, is checked
    before computing, is counted in tokens as a billing engine, and serves hits after."""
    spec = ModelSpec(name="toy-model", engine="toy", dimension=64)
    texts = [TEXTS[0], TEXTS[1], TEXTS[0]]
    with EmbeddingCache("toy-model", cache_dir=cache_dir, remote_url=False) as cache:
        first = _vectors(cache, spec, texts)
        again = _vectors(cache, spec, texts)
        assert toy.computed == texts[:2] and toy.checked == texts[:2]
        assert first.hits is not None and not first.hits.any()
        assert again.hits is None  # all stored: the hot path
        np.testing.assert_array_equal(first.vectors, again.vectors)
        expected = np.frombuffer(b"".join(keys_of(texts)), np.uint8).reshape(3, 64)
        np.testing.assert_array_equal(again.vectors, expected.astype(np.float32))
        assert cache.pipeline.token_stats["toy-model"] == {"computed": 6, "saved": 6}


def test_an_engines_own_input_check_refuses_before_anything_is_computed(
    toy: ToyEngine, cache_dir: Path
) -> None:
    spec = ModelSpec(name="toy-model", engine="toy", dimension=64)
    with EmbeddingCache("toy-model", cache_dir=cache_dir, remote_url=False) as cache:
        with pytest.raises(TextTooLongError, match=r"texts\[2\]: 180 characters"):
            _vectors(cache, spec, TEXTS)
    assert toy.computed == []


def test_the_base_engine_holds_nothing_and_checks_nothing() -> None:
    """The defaults: no tokenizer, no version, no stale weights, takes every text, answers
    no lookup and keeps no push."""
    base, spec = engines.Engine(), ModelSpec(name="m")
    assert base.count_tokens(spec, ["a"]) is None
    assert base.version(spec) is None and base.holds(spec, "v") is None
    assert base.check_inputs(spec, ["a"], truncate=False) is None
    assert not base.bills_tokens and not base.answers_lookups
    with pytest.raises(ProviderError, match="holds no stored vectors"):
        base.lookup(spec, ["a"], prompt="")
    with pytest.raises(ProviderError, match="keeps no vectors"):
        base.push(spec, ["a"], np.zeros((1, 2), np.float32), prompt="")


def _probes(path: Path) -> list[str]:
    """``getattr(...)`` calls and comparisons with a ``.kind`` attribute in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr":
            found.append(f"{path.name}:{node.lineno}: getattr")
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(side, ast.Attribute) and side.attr == "kind" for side in sides):
                found.append(f"{path.name}:{node.lineno}: .kind compared")
    return found


PIPELINE = sorted(p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "pipeline").glob("*.py"))


@pytest.mark.parametrize("module", [*PIPELINE, "tokens.py"])
def test_the_pipeline_asks_no_engine_what_it_is(module: str) -> None:
    """No capability probe (``getattr``) and no test of an engine's ``kind``: engines say
    what they can do through the `Engine` base."""
    assert _probes(PACKAGE / module) == []


def test_the_probe_check_finds_a_probe(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(e):\n    g = getattr(e, 'holds', None)\n    return e.kind != 'backend'\n",
        encoding="utf-8",
    )
    assert _probes(sample) == ["sample.py:2: getattr", "sample.py:3: .kind compared"]
