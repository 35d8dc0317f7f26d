"""A team on one store (issue 28): 4 processes started together on the same 20,000 texts,
the fast model, one SQLite folder and one Postgres database (when
``EMBEDDING_CACHE_TEST_DB_URL`` names a server). Reported: the texts computed in all, against
the distinct ones (target <= 1.02x), and the wall time, against one process alone on the same
texts in the same run (target <= 1.3x)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from .bench_compute import static_model
from .common import Result, sentences

PROCESSES = 4

# One process of the team: loads the model, waits for the start file, embeds, reports what
# its model computed (counted through encode) and its stats.
WORKER = """
import json, sys, time
from pathlib import Path
from sentence_transformers import SentenceTransformer
from embeddingcache import EmbeddingCache

model, store, texts_file, start, out = sys.argv[1:6]
computed = [0]
original = SentenceTransformer.encode

def encode(self, inputs, *args, **kwargs):
    computed[0] += len(inputs)
    return original(self, inputs, *args, **kwargs)

SentenceTransformer.encode = encode
texts = json.loads(Path(texts_file).read_text())
where = {"db_url": store} if "://" in store else {"cache_dir": store}
with EmbeddingCache(model, device="cpu", remote_url=False, batch_size=256, **where) as cache:
    cache.dimension()
    Path(out + ".ready").write_text("")
    while not Path(start).exists():
        time.sleep(0.002)
    began = time.time()
    cache.get_embeddings(texts)
    ended = time.time()
    stats = cache.stats
Path(out).write_text(json.dumps({"computed": computed[0], "began": began, "ended": ended,
                                 "stats": stats}))
"""


def _run(model: str, store: str, texts_file: Path, folder: Path, n: int) -> tuple[int, float]:
    """``n`` processes started together: the texts computed in all, and the wall time from
    the start to the last one's end."""
    folder.mkdir(parents=True)
    start = folder / "start"
    outs = [folder / f"p{i}.json" for i in range(n)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, model, store, str(texts_file), str(start), str(out)]
        )
        for out in outs
    ]
    try:
        while not all(Path(f"{out}.ready").exists() for out in outs):
            if any(p.poll() not in (None, 0) for p in processes):
                raise RuntimeError("a team process failed")
            time.sleep(0.05)
        began = time.time()
        start.write_text("go")
        for process in processes:
            if process.wait(600) != 0:
                raise RuntimeError("a team process failed")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    reports = [json.loads(out.read_text()) for out in outs]
    return sum(r["computed"] for r in reports), max(r["ended"] for r in reports) - began


def _postgres(admin_url: str) -> tuple[str, Callable[[], None]]:
    from sqlalchemy import create_engine, make_url, text

    name = f"ec_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(
        make_url(admin_url).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


def _store(
    work: Path, tag: str, name: str, admin_url: str | None, drops: list[Callable[[], None]]
) -> str:
    """A new store: a folder, or a database of its own on the server (dropped afterwards)."""
    if admin_url is None:
        return str(work / f"team-{tag}-{name}")
    url, drop = _postgres(admin_url)
    drops.append(drop)
    return url


def team(work: Path, quick: bool) -> list[Result]:
    model = str(static_model(work / "static-model"))
    n = 5_000 if quick else 20_000
    texts_file = work / "team-texts.json"
    texts_file.write_text(json.dumps(sentences(n, seed=4242, prefix="team ")))
    stores: dict[str, str | None] = {"SQLite folder": None}
    admin = os.environ.get("EMBEDDING_CACHE_TEST_DB_URL")
    if admin:
        stores["Postgres"] = admin
    results = []
    for kind, admin_url in stores.items():
        tag = kind.split()[0].lower()
        drops: list[Callable[[], None]] = []
        try:
            _, alone = _run(
                model,
                _store(work, tag, "alone", admin_url, drops),
                texts_file,
                work / f"{tag}-alone",
                1,
            )
            computed, together = _run(
                model,
                _store(work, tag, "team", admin_url, drops),
                texts_file,
                work / f"{tag}-team",
                PROCESSES,
            )
        finally:
            for drop in drops:
                drop()
        duplicates = computed / n
        ratio = together / alone
        results.append(
            Result(
                f"17. a team on one store: {PROCESSES} processes, {kind}",
                f"{n:,} texts, the fast model, {PROCESSES} processes started together: "
                "wall time, and texts computed in all",
                together,
                alone,
                "one process alone on the same texts, same run",
                ratio,
                "<= 1.3x wall, <= 1.02x computed",
                ratio <= 1.3 and duplicates <= 1.02,
                unit="s",
                notes=[
                    f"{kind}: {computed:,} texts computed for {n:,} distinct "
                    f"({duplicates:.3f}x); {together:.2f} s together against {alone:.2f} s "
                    f"alone ({ratio:.2f}x)"
                ],
            )
        )
    return results
