"""A backup while a writer writes (issue 33): how long the writer's puts take while
`EmbeddingCache.backup` copies the cache, against the same writer in the same run while the
same files are copied with ``cp`` (the same bytes read and written and synced, no SQLite
lock: what the machine's contention alone costs), and with nothing else going on. The writer
is another process storing 200 vectors a time through the library's write path (`Store.put`:
the texts' transaction, then the vectors'), as fast as it can. Also reported: the backup's
and the restore's throughput."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import MODEL, Result, fill, percentile, random_vectors, sentences

BATCH = 200
BASELINE_S = 4.0
BACKUPS = 3
COPIES = 8  # a cp takes a fraction of a backup's time: more of them, for as many puts

# Stores BATCH new vectors at a time until the stop file appears; writes each put's start
# (time.time()) and duration to OUT.
WRITER = """
import json, sys, time
from pathlib import Path
import numpy as np
from embeddingcache.keys import keys_of
from embeddingcache.storage import Store, layout_for

folder, model, batch, stop, out = sys.argv[1:6]
batch = int(batch)
store = Store(layout_for(Path(folder), None))
rng = np.random.default_rng(7)
timings, n = [], 0
Path(out + ".ready").write_text("")
while not Path(stop).exists():
    texts = [f"written during the backup {n} {i}" for i in range(batch)]
    vectors = rng.standard_normal((batch, 384), dtype=np.float32)
    began = time.time()
    store.put(model, keys_of(texts), texts, vectors)
    timings.append((began, time.time() - began))
    n += 1
store.close()
Path(out).write_text(json.dumps(timings))
"""


def _window(timings: list[list[float]], start: float, end: float) -> list[float]:
    """The durations, in ms, of the puts that began within ``[start, end)``."""
    return [1000 * d for began, d in timings if start <= began < end]


def _cp(folder: Path, target: Path) -> None:
    """What a user's ``cp -r`` does, and a sync: every file of the cache, as it is."""
    target.mkdir()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            shutil.copyfile(path, target / path.name)
            with open(target / path.name, "rb+") as file:
                os.fsync(file.fileno())


def _timed(run: object, count: int, pause: float) -> list[tuple[float, float]]:
    """``run(i)`` ``count`` times, each followed by ``pause`` s: each one's time window."""
    windows = []
    for i in range(count):
        began = time.time()
        run(i)  # type: ignore[operator]
        windows.append((began, time.time()))
        time.sleep(pause)
    return windows


def backup_beside_a_writer(work: Path, quick: bool) -> list[Result]:
    from embeddingcache import EmbeddingCache

    n = 10_000 if quick else 100_000
    folder = work / "backup-cache"
    fill(folder, sentences(n, seed=33), random_vectors(n, seed=33))
    stop, out = work / "backup-stop", work / "backup-writer.json"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(folder), MODEL, str(BATCH), str(stop), str(out)]
    )
    try:
        while not Path(f"{out}.ready").exists():
            if writer.poll() is not None:
                raise RuntimeError("the writer failed")
            time.sleep(0.05)
        time.sleep(1.0)  # warm: its first puts open the files
        baseline = (time.time(), time.time() + BASELINE_S)
        time.sleep(BASELINE_S)
        copies = _timed(lambda i: _cp(folder, work / f"backup-cp-{i}"), COPIES, 0.5)
        reports = []
        with EmbeddingCache(MODEL, cache_dir=folder, remote_url=False) as cache:
            windows = _timed(
                lambda i: reports.append(cache.backup(work / f"backup-{i}")), BACKUPS, 0.5
            )
    finally:
        stop.touch()
        if writer.wait(120) != 0:
            raise RuntimeError("the writer failed")
    timings = json.loads(out.read_text())
    during = [d for start, end in windows for d in _window(timings, start, end)]
    copying = [d for start, end in copies for d in _window(timings, start, end)]
    alone = _window(timings, *baseline)
    size = sum(f.bytes for f in reports[0].files)
    backup_s = min(r.seconds for r in reports)
    began = time.monotonic()
    with EmbeddingCache(MODEL, cache_dir=work / "backup-restored", remote_url=False) as cache:
        cache.restore(work / "backup-0")
    restore_s = time.monotonic() - began
    p99, p99_cp = percentile(during, 99), percentile(copying, 99)
    return [
        Result(
            name="19. a backup beside a writer",
            measure=f"p99 of a put of {BATCH} vectors during a backup of {n:,} (ms)",
            library=p99,
            baseline=p99_cp,
            baseline_name="the same writer during a cp of the same files, same run",
            ratio=p99 / p99_cp,
            target="<= 1.5x, or within 50 ms",
            met=p99 <= 1.5 * p99_cp or p99 - p99_cp <= 50,
            unit="ms",
            notes=[
                f"puts during {BACKUPS} backups: {_summary(during)}; during {COPIES} cp: "
                f"{_summary(copying)}; with nothing else going on: {_summary(alone)}; no "
                "lock of the backup is waited for (a read transaction in WAL mode): the "
                "puts slow down as they do under any copy of as many bytes",
                f"backup of {size / 1e6:.0f} MB to a folder: {backup_s:.2f} s "
                f"({size / 1e6 / backup_s:.0f} MB/s, the writer writing); restore "
                f"{restore_s:.2f} s ({size / 1e6 / restore_s:.0f} MB/s)",
            ],
        )
    ]


def _summary(durations: list[float]) -> str:
    return (
        f"{len(durations)}, p50 {percentile(durations, 50):.1f} ms, p99 "
        f"{percentile(durations, 99):.1f} ms, longest {max(durations):.0f} ms"
    )
