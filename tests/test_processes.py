"""Behaviour that only shows across processes: imports, and several writers at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from embeddingcache import EmbeddingCache

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_a_process_that_only_hits_never_imports_torch(tiny_model: str, cache_dir: Path) -> None:
    texts = ["warm one", "warm two", "warm three"]
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        expected = cache.get_embeddings(texts)
    result = run_python(
        """
        import json, sys
        import embeddingcache
        vectors = embeddingcache.get_embeddings(json.loads(sys.argv[1]), sys.argv[2],
                                                cache_dir=sys.argv[3])
        heavy = sorted(m for m in ("torch", "sentence_transformers", "transformers")
                       if m in sys.modules)
        print(json.dumps({"heavy": heavy, "vectors": vectors.tolist()}))
        """,
        json.dumps(texts),
        tiny_model,
        str(cache_dir),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["heavy"] == []
    np.testing.assert_array_equal(np.asarray(report["vectors"], dtype=np.float32), expected)


DROP_UNCLOSED = """
import gc, os, sys
from embeddingcache import EmbeddingCache
model, cache_dir, how = sys.argv[1:4]
cache = EmbeddingCache(model, cache_dir=cache_dir, device="cpu")
cache.get_embeddings(["kept one", "kept two", "kept three"])  # 3 hits, nothing computed
if how == "del":
    del cache
    gc.collect()
    os._exit(0)  # no exit handlers: only the drop itself may have written the counts
"""  # how == "exit": the interpreter exits with the cache still open


def test_a_cache_dropped_or_left_open_without_close_still_records_its_use(
    tiny_model: str, cache_dir: Path
) -> None:
    """Use counts wait in memory; a cache garbage-collected, or open at exit, writes them."""
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        cache.get_embeddings(["kept one", "kept two", "kept three"])
    for how in ("del", "exit"):
        result = run_python(DROP_UNCLOSED, tiny_model, str(cache_dir), how)
        assert result.returncode == 0, result.stderr
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        (summary,) = cache.contents().shards
    assert (summary.hits, summary.misses) == (6, 3)


WRITER = """
import json, sys, time
from pathlib import Path
from embeddingcache import EmbeddingCache
model, storage, start_flag, first, last = sys.argv[1:6]
texts = [f"shared text number {i}" for i in range(int(first), int(last))]
while not Path(start_flag).exists():
    time.sleep(0.01)
with EmbeddingCache(model, device="cpu", **json.loads(storage)) as cache:
    for start in range(0, len(texts), 15):
        cache.get_embeddings(texts[start:start + 15])
    print(json.dumps(cache.stats))
"""


def test_several_processes_writing_one_cache_lose_nothing(
    tiny_model: str, storage: dict[str, Any], tmp_path: Path, direct_model: Any
) -> None:
    """4 processes, overlapping texts, one brand-new cache: no error, each text stored once."""
    start_flag = tmp_path / "go"
    ranges = [(0, 60), (30, 90), (60, 120), (0, 120)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                tiny_model,
                json.dumps(storage, default=str),
                str(start_flag),
                str(a),
                str(b),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for a, b in ranges
    ]
    start_flag.touch()
    outputs = [w.communicate(timeout=300) for w in writers]
    for writer, (_, err) in zip(writers, outputs, strict=True):
        assert writer.returncode == 0, err
    texts = [f"shared text number {i}" for i in range(120)]
    with EmbeddingCache(tiny_model, device="cpu", **storage) as cache:
        contents = cache.contents()
        assert contents.texts == 120
        assert [s.entries for s in contents.shards] == [120]
        np.testing.assert_allclose(
            cache.get_embeddings(texts), direct_model.encode(texts), atol=1e-5
        )
        assert cache.stats["computed"] == 0
