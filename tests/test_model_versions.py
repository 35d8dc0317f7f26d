"""A model that changes under its name is never served its old vectors (issue 14).

The fine-tuning loop of a user who keeps tuning one pipeline: embed, save new weights to the same
folder, embed again; in one process and across processes; then back to the first weights. And
the same for a Hub id whose snapshot moves to a new commit, and for a backend restarted with
other weights under the same name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embeddingcache import EmbeddingCache
from embeddingcache.versions import folder_version, short

TEXTS = ["a sentence to embed", "another one", "and a third"]


def fine_tune(folder: Path, seed: int) -> None:
    """Save weights moved as a training step would, to the same folder."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(0.05 * noise)
    model.save(str(folder))


def encode(folder: Path, texts: list[str]) -> np.ndarray:
    """What the model saved in ``folder`` gives, loaded afresh."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)


def restore(snapshot: Path, folder: Path) -> None:
    shutil.rmtree(folder)
    shutil.copytree(snapshot, folder)


@pytest.fixture
def model_folder(tiny_model: str, tmp_path: Path) -> Path:
    folder = tmp_path / "my-model"
    shutil.copytree(tiny_model, folder)
    return folder


def test_weights_saved_in_place_are_seen_on_the_next_call_and_never_mixed(
    model_folder: Path, tmp_path: Path, encode_spy: Any
) -> None:
    first_weights = tmp_path / "checkpoint-1"
    shutil.copytree(model_folder, first_weights)
    with EmbeddingCache(str(model_folder), cache_dir=tmp_path / "cache", device="cpu") as cache:
        before = cache.get_embeddings(TEXTS)
        fine_tune(model_folder, seed=1)
        after = cache.get_embeddings(TEXTS)  # all were hits of the old weights
        np.testing.assert_array_equal(after, encode(model_folder, TEXTS))
        assert not np.allclose(before, after)

        # Back to the first weights: their vectors again, and nothing computed.
        restore(first_weights, model_folder)
        computed = len(encode_spy.texts)
        np.testing.assert_array_equal(cache.get_embeddings(TEXTS), before)
        assert len(encode_spy.texts) == computed

        versions = {s.model: s for s in cache.contents().shards if s.model is not None}
    base = str(model_folder)
    tuned = next(name for name in versions if name != base)
    assert tuned.startswith(base + "@") and versions[tuned].entries == len(TEXTS)
    assert versions[base].entries == len(TEXTS)
    assert versions[base].revision == folder_version(first_weights)


def test_a_text_served_from_memory_is_not_served_once_the_weights_change(
    model_folder: Path, tmp_path: Path
) -> None:
    """One text asked for again and again (the memory tier's) gets the new weights' vector
    on the first call after they are saved."""
    text = TEXTS[0]
    with EmbeddingCache(str(model_folder), cache_dir=tmp_path / "cache", device="cpu") as cache:
        before = cache.get_embeddings(text)
        np.testing.assert_array_equal(cache.get_embeddings(text), before)
        fine_tune(model_folder, seed=3)
        after = cache.get_embeddings(text)
        np.testing.assert_array_equal(after, encode(model_folder, [text])[0])
        assert not np.allclose(before, after)
        np.testing.assert_array_equal(cache.get_embeddings([text])[0], after)


def test_new_texts_after_a_save_go_to_the_new_version_only(
    model_folder: Path, tmp_path: Path
) -> None:
    with EmbeddingCache(str(model_folder), cache_dir=tmp_path / "cache", device="cpu") as cache:
        cache.get_embeddings(TEXTS[:1])
        fine_tune(model_folder, seed=2)
        new = cache.get_embeddings(TEXTS)
        np.testing.assert_array_equal(new, encode(model_folder, TEXTS))
        entries = {s.model: s.entries for s in cache.contents().shards}
    assert entries[str(model_folder)] == 1  # the first weights' shard holds only their vector
    assert sorted(entries.values()) == [1, len(TEXTS)]


CHILD = """
import json, sys
import httpx
import numpy as np
from embeddingcache import EmbeddingCache
from sentence_transformers import SentenceTransformer

calls = []
encode = SentenceTransformer.encode
def counted(self, texts, *args, **kwargs):
    calls.append(len(texts))
    return encode(self, texts, *args, **kwargs)
SentenceTransformer.encode = counted

model, cache_dir, out = sys.argv[1:4]
with EmbeddingCache(model, cache_dir=cache_dir, device="cpu") as cache:
    np.save(out, cache.get_embeddings(json.loads(sys.argv[4])))
print(json.dumps({"encoded": sum(calls)}))
"""


def _embed_in_a_new_process(model: str, cache_dir: Path, out: Path, **env: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(cache_dir), str(out), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(json.loads(done.stdout.strip().splitlines()[-1])["encoded"])


def test_across_processes_each_version_is_computed_once(model_folder: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first_weights = tmp_path / "checkpoint-1"
    shutil.copytree(model_folder, first_weights)
    out = tmp_path / "out.npy"
    assert _embed_in_a_new_process(str(model_folder), cache_dir, out) == len(TEXTS)
    before = np.load(out)
    fine_tune(model_folder, seed=3)
    assert _embed_in_a_new_process(str(model_folder), cache_dir, out) == len(TEXTS)
    np.testing.assert_array_equal(np.load(out), encode(model_folder, TEXTS))
    restore(first_weights, model_folder)
    assert _embed_in_a_new_process(str(model_folder), cache_dir, out) == 0
    np.testing.assert_array_equal(np.load(out), before)


def test_a_hub_snapshot_moved_to_a_new_commit_is_a_new_version(
    tiny_model: str, tmp_path: Path
) -> None:
    hub = tmp_path / "hub"
    repo = hub / "models--acme--tiny"
    first, second = "1" * 40, "2" * 40
    shutil.copytree(tiny_model, repo / "snapshots" / first)
    shutil.copytree(tiny_model, repo / "snapshots" / second)
    fine_tune(repo / "snapshots" / second, seed=4)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    cache_dir, out = tmp_path / "cache", tmp_path / "out.npy"
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}

    assert _embed_in_a_new_process("acme/tiny", cache_dir, out, **env) == len(TEXTS)
    np.testing.assert_array_equal(np.load(out), encode(repo / "snapshots" / first, TEXTS))
    (repo / "refs" / "main").write_text(second)
    assert _embed_in_a_new_process("acme/tiny", cache_dir, out, **env) == len(TEXTS)
    np.testing.assert_array_equal(np.load(out), encode(repo / "snapshots" / second, TEXTS))
    (repo / "refs" / "main").write_text(first)
    assert _embed_in_a_new_process("acme/tiny", cache_dir, out, **env) == 0

    with EmbeddingCache("acme/tiny", cache_dir=cache_dir) as cache:
        revisions = {s.model: s.revision for s in cache.contents().shards}
    assert revisions == {
        "acme/tiny": f"commit:{first}",
        f"acme/tiny@{second[:16]}": f"commit:{second}",
    }


def test_a_shard_of_an_earlier_release_takes_the_version_found_first(
    model_folder: Path, tmp_path: Path, encode_spy: Any
) -> None:
    """A shard without a recorded version (as every shard before versions) keeps serving."""
    from sqlalchemy import create_engine, text

    cache_dir = tmp_path / "cache"
    with EmbeddingCache(str(model_folder), cache_dir=cache_dir, device="cpu") as cache:
        stored = cache.get_embeddings(TEXTS)
        shard = next(cache_dir / s.place for s in cache.contents().shards)
    engine = create_engine(f"sqlite:///{shard}")
    with engine.begin() as connection:
        connection.execute(text("UPDATE model_info SET revision = NULL"))
    engine.dispose()
    with EmbeddingCache(str(model_folder), cache_dir=cache_dir, device="cpu") as cache:
        computed = len(encode_spy.texts)
        np.testing.assert_array_equal(cache.get_embeddings(TEXTS), stored)
        assert len(encode_spy.texts) == computed
        (summary,) = cache.contents().shards
    assert summary.revision == folder_version(model_folder)


def test_the_hit_path_stats_a_few_files_and_imports_no_torch(
    model_folder: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    with EmbeddingCache(str(model_folder), cache_dir=cache_dir, device="cpu") as cache:
        cache.get_embeddings(TEXTS)
    script = """
import os, sys, json
from embeddingcache import EmbeddingCache
cache = EmbeddingCache(sys.argv[1], cache_dir=sys.argv[2])
cache.get_embeddings(json.loads(sys.argv[3]))  # the first call checks every file
folder = os.path.realpath(sys.argv[1])
stats = []
real_stat = os.stat
def counting(path, *args, **kwargs):
    if str(path).startswith(folder):
        stats.append(str(path))
    return real_stat(path, *args, **kwargs)
os.stat = counting
scans = []
real_scandir = os.scandir
def scanning(path):
    scans.append(path)
    return real_scandir(path)
os.scandir = scanning
import time
started = time.monotonic()
for _ in range(100):
    cache.get_embeddings(json.loads(sys.argv[3]))
print(json.dumps({
    "stats": len(stats),
    "scans": len(scans),
    "seconds": time.monotonic() - started,
    "torch": "torch" in sys.modules,
}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(model_folder), str(cache_dir), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["torch"] is False
    # Per call: the name's three (the folder, its prompt config: models.resolve_model) and the
    # weights file's; the full check of every file at most once a second.
    assert 0 < seen["stats"] <= 4 * 100
    folders = 1 + sum(1 for p in model_folder.rglob("*") if p.is_dir())
    assert seen["scans"] <= folders * (int(seen["seconds"]) + 1)


def test_the_version_names_the_shard_of_a_later_version(model_folder: Path) -> None:
    version = folder_version(model_folder)
    assert len(short(version)) == 16 and version.startswith("sha256:" + short(version))


def test_prune_removes_the_versions_whose_weights_are_gone(
    model_folder: Path, tmp_path: Path, encode_spy: Any
) -> None:
    with EmbeddingCache(str(model_folder), cache_dir=tmp_path / "cache", device="cpu") as cache:
        cache.get_embeddings(TEXTS)
        fine_tune(model_folder, seed=5)
        tuned = cache.get_embeddings(TEXTS)
        assert cache.prune(stale_versions=True, dry_run=True).removed == {str(model_folder): 3}
        report = cache.prune(stale_versions=True)
        assert report.removed == {str(model_folder): len(TEXTS)}
        computed = len(encode_spy.texts)
        np.testing.assert_array_equal(cache.get_embeddings(TEXTS), tuned)  # still stored
        assert len(encode_spy.texts) == computed
        assert cache.prune(stale_versions=True).removed == {}


def test_a_backend_restarted_with_other_weights_under_the_same_name_serves_no_old_vectors(
    start_server: Any, model_folder: Path, tmp_path: Path
) -> None:
    def remote_client() -> EmbeddingCache:
        return EmbeddingCache(
            str(model_folder),
            cache_dir=tmp_path / "client",
            remote_url=server.url,
            fallback_providers=("remote",),
        )

    server, _ = start_server(models=[str(model_folder)])
    with remote_client() as client:
        before = client.get_embeddings(TEXTS)
    np.testing.assert_array_equal(before, encode(model_folder, TEXTS))
    server.stop()

    fine_tune(model_folder, seed=6)
    server, backend = start_server(models=[str(model_folder)])
    with remote_client() as client:
        after = client.get_embeddings(TEXTS)  # the client's own copies are of the old weights
        np.testing.assert_array_equal(after, encode(model_folder, TEXTS))
        assert client.stats["hits"] == 0
        np.testing.assert_array_equal(client.get_embeddings(TEXTS), after)
        assert client.stats["hits"] == len(TEXTS)
    answer = httpx.post(f"{server.url}/embed", json={"texts": TEXTS[:1], "lookup_only": True})
    assert answer.json()["version"] == folder_version(model_folder)
    assert backend.stats()["computed"] == len(TEXTS)


def test_vectors_pushed_for_another_version_are_refused(
    start_server: Any, model_folder: Path, tmp_path: Path
) -> None:
    server, backend = start_server(models=[str(model_folder)], allow_push=True)
    body = {
        "texts": TEXTS[:1],
        "model": str(model_folder),
        "embeddings": [[0.5] * 32],
        "version": "sha256:" + "0" * 64,
    }
    answer = httpx.post(f"{server.url}/push", json=body)
    assert answer.status_code == 409 and "version" in answer.json()["detail"]
    assert backend.stats()["accepted_pushes"] == 0


def test_each_version_has_its_own_shard_on_every_backend(
    model_folder: Path, storage: dict[str, Any], encode_spy: Any
) -> None:
    with EmbeddingCache(str(model_folder), device="cpu", **storage) as cache:
        before = cache.get_embeddings(TEXTS)
        first = {p.name: p.read_bytes() for p in model_folder.glob("*.safetensors")}
        fine_tune(model_folder, seed=7)
        np.testing.assert_array_equal(cache.get_embeddings(TEXTS), encode(model_folder, TEXTS))
        for name, weights in first.items():
            (model_folder / name).write_bytes(weights)  # a checkpoint restored in place
        computed = len(encode_spy.texts)
        np.testing.assert_array_equal(cache.get_embeddings(TEXTS), before)
        assert len(encode_spy.texts) == computed
        assert len(cache.contents().shards) == 2
