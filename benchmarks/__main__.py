"""Run every benchmark, print the table, and write docs/benchmarks.md and its chart.

python -m benchmarks [--quick] [--only NAME ...] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .common import Result

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results.json"


def _suites() -> dict[str, Callable[[Path, bool], list[Result]]]:
    from . import (
        bench_alternatives,
        bench_api,
        bench_backup,
        bench_compute,
        bench_concurrency,
        bench_hits,
        bench_openai,
        bench_ray,
        bench_remote,
        bench_storage,
        bench_team,
    )

    return {
        "hits": bench_hits.warm_hits,
        "cold": bench_compute.cold_misses,
        "static": bench_compute.static_cold_misses,
        "process": bench_compute.fresh_process,
        "langchain": bench_alternatives.langchain,
        "remote": bench_remote.remote,
        "openai": bench_openai.openai_api,
        "concurrency": bench_concurrency.readers_beside_a_writer,
        "growth": bench_hits.growth,
        "writes": bench_storage.writes,
        "readonly": bench_storage.read_only,
        "postgres": bench_storage.postgres,
        "api": bench_api.api,
        "team": bench_team.team,
        "ray": bench_ray.ray_job,
        "dask": bench_ray.dask_job,
        "backup": bench_backup.backup_beside_a_writer,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller growth")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="run these suites only (prints, writes nothing)"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="run nothing: rewrite the page and chart from benchmarks/results.json",
    )
    args = parser.parse_args()
    if args.render:
        saved = json.loads(RESULTS.read_text(encoding="utf-8"))
        results = [Result(**r) for r in saved["results"]]
        _write(results, saved["command"], saved["date"], saved["machine"])
        return 0
    suites = _suites()
    chosen = args.only or list(suites)
    unknown = [name for name in chosen if name not in suites]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {', '.join(suites)}")
    results: list[Result] = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="embeddingcache-bench-") as work:
        for name in chosen:
            print(f"== {name}", file=sys.stderr, flush=True)
            before = time.time()
            found = suites[name](Path(work), args.quick)
            for result in found:
                print("   " + _line(result), file=sys.stderr, flush=True)
            print(f"   ({time.time() - before:.0f} s)", file=sys.stderr, flush=True)
            results += found
    results.sort(key=lambda r: int(r.name.split(".")[0]))  # stable: suite order within
    machine = _machine()
    print(_table(results))
    print(f"\n{machine}; {time.time() - started:.0f} s in all")
    if not args.no_write and not args.only:  # the page shows complete runs only
        command = "python -m benchmarks" + (" --quick" if args.quick else "")
        date = time.strftime("%Y-%m-%d")
        RESULTS.write_text(
            json.dumps(
                {
                    "command": command,
                    "date": date,
                    "machine": machine,
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        _write(results, command, date, machine)
    return 0 if all(r.met for r in results) else 1


def _line(r: Result) -> str:
    mark = "met" if r.met else "MISSED"
    return f"{r.name}: {r.ratio:.3g}x (target {r.target}) {mark}"


def _number(value: float, unit: str) -> str:
    if unit == "us":
        return f"{value:.1f} µs"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "x":
        return f"{value:.3g}x"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def _table(results: list[Result]) -> str:
    rows = [
        "| benchmark | measure | embeddingcache | baseline | baseline is | ratio | target | |",
        "|---|---|---:|---:|---|---:|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r.name} | {r.measure} | {_number(r.library, r.unit)} | "
            f"{_number(r.baseline, r.unit)} | {r.baseline_name} | {r.ratio:.3g}x | "
            f"{r.target} | {'met' if r.met else '**missed**'} |"
        )
    notes = [f"- {r.name}: {note}" for r in results for note in r.notes]
    return "\n".join(rows) + ("\n\nNotes:\n\n" + "\n".join(notes) if notes else "")


def _machine() -> str:
    return (
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )


def _write(results: list[Result], command: str, date: str, machine: str) -> None:
    DOCS.mkdir(exist_ok=True)
    _chart(results, DOCS / "benchmarks.png")
    page = DOCS / "benchmarks.md"
    text = page.read_text(encoding="utf-8")
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    block = (
        f"{begin}\n\nLast run: `{command}`, {date}, {machine}.\n\n"
        f"{_table(results)}\n\n![Each result against its target](benchmarks.png)\n\n{end}"
    )
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    page.write_text(head + block + tail, encoding="utf-8")


def _chart(results: list[Result], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if r.target != "reported"]  # figures with no target
    # Margin: how many times better than its target each result is (1 = just met).
    margins = []
    for r in results:
        found = re.search(r"([<>])=\s*([\d.]+)x", r.target)
        assert found, r.target
        bound = float(found.group(2))
        margins.append(r.ratio / bound if found.group(1) == ">" else bound / r.ratio)
    figure, axes = plt.subplots(figsize=(9, 0.45 * len(results) + 1.2))
    names = [r.name for r in results]
    colors = ["#2b8a3e" if r.met else "#c92a2a" for r in results]
    axes.barh(names, margins, color=colors)
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_xscale("log")
    axes.invert_yaxis()
    axes.set_xlabel("result / target (log scale; right of the line: target met)")
    for y, (margin, r) in enumerate(zip(margins, results, strict=True)):
        axes.text(margin, y, f" {r.ratio:.3g}x ({r.target})", va="center", fontsize=8)
    axes.set_title("embeddingcache against its baselines")
    axes.set_xlim(min(0.8, min(margins) * 0.9), max(margins) * 2.2)
    axes.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
