"""A model's version follows its weights, cheaply: stat on the read path, hashing on change only."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from embeddingcache import versions
from embeddingcache.versions import VersionWatch, folder_version, hub_commit, hub_version


def _model(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"hidden_size": 4}')
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return folder


def test_a_folder_rewritten_in_place_gets_a_new_version_and_a_restored_one_its_old(
    tmp_path: Path,
) -> None:
    folder = _model(tmp_path / "m", b"first weights")
    first = folder_version(folder)
    (folder / "model.safetensors").write_bytes(b"tuned weights")
    second = folder_version(folder)
    _model(folder, b"first weights")
    assert first.startswith("sha256:") and first != second
    assert folder_version(folder) == first


def test_docs_and_hidden_files_do_not_change_the_version(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m", b"w")
    before = folder_version(folder)
    (folder / "README.md").write_text("a model card")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref")
    assert folder_version(folder) == before


def test_a_change_in_a_module_subfolder_is_a_new_version(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m", b"w")
    before = folder_version(folder)
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert folder_version(folder) != before


def test_files_are_hashed_only_when_their_stat_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _model(tmp_path / "m", b"w" * 1000)
    hashed: list[str] = []
    real = versions._file_digest
    monkeypatch.setattr(versions, "_digests", {})
    monkeypatch.setattr(
        versions, "_file_digest", lambda path, stamp: hashed.append(path.name) or real(path, stamp)
    )
    watch = VersionWatch(str(folder), interval=0)
    first = watch.current()
    count = len(hashed)
    assert watch.current() == first and len(hashed) == count  # same stat: no hashing at all
    (folder / "model.safetensors").write_bytes(b"v" * 1000)
    assert watch.current() != first


def test_the_read_path_stats_at_most_once_per_interval_and_computing_always(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _model(tmp_path / "m", b"w")
    watch = VersionWatch(str(folder), interval=3600)
    first = watch.current()
    scans: list[Path] = []
    real = os.scandir
    monkeypatch.setattr(versions.os, "scandir", lambda p: scans.append(p) or real(p))
    for _ in range(100):
        assert watch.current() == first
    assert scans == []
    (folder / "model.safetensors").write_bytes(b"new")
    assert watch.current() == first  # within the interval: the cached answer
    assert watch.current(fresh=True) != first  # before computing: always checked
    assert len(scans) == 2  # the folder and its one module subfolder, once


def test_a_hub_id_is_versioned_by_the_commit_its_local_cache_resolves_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub_commit("org/model") is None
    refs = tmp_path / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    watch = VersionWatch("org/model", interval=0)
    assert watch.current() == "commit:" + "a" * 40
    (refs / "main").write_text("b" * 40)  # the snapshot moved to a new commit
    assert watch.current() == hub_version("org/model") == "commit:" + "b" * 40
    assert hub_commit("org/model", "c" * 40) == "c" * 40  # a pinned commit is itself


def test_the_probe_tolerates_device_noise_and_catches_one_fine_tuning_step() -> None:
    from embeddingcache.versions import PROBE_TOLERANCE, probe_distance, probe_version

    rng = np.random.default_rng(0)
    stored = rng.standard_normal((3, 384)).astype(np.float32)
    half = stored.astype(np.float16).astype(np.float32)  # another device's float16 answer
    tuned = stored + 0.05 * rng.standard_normal((3, 384)).astype(np.float32)
    assert probe_distance(stored, half) < PROBE_TOLERANCE
    assert probe_distance(stored, tuned) > PROBE_TOLERANCE
    assert probe_distance(stored, stored[:, :128]) == float("inf")
    assert probe_version(stored) == probe_version(stored.copy()) != probe_version(tuned)
