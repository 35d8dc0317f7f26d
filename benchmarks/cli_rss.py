"""Peak RSS of ``embeddingcache embed --out FILE.npy`` against its line count (issue 32).

python -m benchmarks.cli_rss [LINES ...]   # default: 20000 200000

Each run is a fresh process (``os.wait4`` gives its own ``ru_maxrss``) embedding distinct
lines with the tests' StaticEmbedding model (256-d, built offline) into a new cache, so every
line is computed, stored and written. Prints one line per count and the spread; the target
is under 50 MB between 20,000 and 200,000 lines. Set ``PYTHONPATH`` to measure another
checkout's code with the same script.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .bench_compute import static_model
from .common import sentences

TARGET_MB = 50


def peak_rss_mb(lines: int, work: Path, model: Path) -> float:
    """The peak RSS of one ``embeddingcache embed`` of ``lines`` distinct lines, in MB."""
    source = work / f"lines-{lines}.txt"
    source.write_text("\n".join(sentences(lines, seed=lines)) + "\n", encoding="utf-8")
    out = work / f"out-{lines}.npy"
    command = [sys.executable, "-m", "embeddingcache.cli", "embed", str(source)]
    command += ["-m", str(model), "--cache-dir", str(work / f"cache-{lines}"), "-o", str(out)]
    command += ["--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    errors = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"embeddingcache embed failed: {errors[-2000:]}")
    assert np.load(out, mmap_mode="r").shape == (lines, 256)
    return usage.ru_maxrss / 1024  # kilobytes on Linux


def main() -> int:
    counts = [int(a) for a in sys.argv[1:]] or [20_000, 200_000]
    with tempfile.TemporaryDirectory(prefix="embeddingcache-rss-") as name:
        work = Path(name)
        model = static_model(work / "static-model")
        peaks = {n: peak_rss_mb(n, work, model) for n in counts}
    for n, peak in peaks.items():
        print(f"{n:>9,} lines: peak RSS {peak:,.0f} MB")
    spread = max(peaks.values()) - min(peaks.values())
    print(f"spread {spread:,.0f} MB (target: under {TARGET_MB} MB)")
    return 0 if spread < TARGET_MB else 1


if __name__ == "__main__":
    sys.exit(main())
