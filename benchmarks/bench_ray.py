"""A Ray Data job (issue 29): 20,000 texts, each in two rows far apart, embedded by 2 actors
of a local Ray cluster (``EmbedBatches``), against one process alone on the same rows in one
call, in the same run: the fast
model, one Postgres database each (a SQLite folder when ``EMBEDDING_CACHE_TEST_DB_URL``
names no server). Reported: the wall time of each (the job's from its start to its last row,
actors starting and loading the model included; the process's from its call, the model
loaded), and the texts computed beyond the distinct ones (target 0)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .bench_compute import static_model
from .bench_team import _store
from .common import Result, sentences

ACTORS = 2
BATCH = 1_000


def _counting(base: type | None = None) -> type:
    """``base`` (`EmbedBatches`) adding what each batch computed; defined here so that Ray
    and Dask pickle it by value."""
    if base is None:
        from embeddingcache.integrations.ray import EmbedBatches as base

    class Counting(base):  # type: ignore[valid-type,misc]
        def __call__(self, batch: Any) -> Any:
            before = self.cache.stats["computed"]
            out = super().__call__(batch)
            computed = np.zeros(len(out["text"]), dtype=np.int64)
            computed[0] = self.cache.stats["computed"] - before
            if isinstance(out, dict):
                out["computed"] = computed
                return out
            return out.assign(computed=computed)

    return Counting


def _job(model: str, store: str, texts: list[str]) -> tuple[int, float, float, float]:
    """The Ray job on a new store: texts computed in all, wall time, the rate of the rows
    after the first batch came back (the actors started, the model loaded), and how long
    `missing` then took to tell that nothing is left."""
    import ray

    from embeddingcache import EmbeddingCache

    where = {"db_url": store} if "://" in store else {"cache_dir": store}
    cache = EmbeddingCache(model, device="cpu", remote_url=False, batch_size=256, **where)
    # Every text twice, in blocks far apart: two actors could each compute it.
    dataset = ray.data.from_items([{"text": t} for t in texts + texts], override_num_blocks=20)
    began = time.perf_counter()
    computed = rows = 0
    first = (0.0, 0)
    for batch in dataset.map_batches(
        _counting(),
        fn_constructor_args=(cache,),
        compute=ray.data.ActorPoolStrategy(size=ACTORS),
        batch_size=BATCH,
    ).iter_batches(batch_size=None, batch_format="numpy"):
        computed += int(batch["computed"].sum())
        rows += len(batch["text"])
        if not first[1]:
            first = (time.perf_counter(), rows)
    ended = time.perf_counter()
    asked = time.perf_counter()
    left = cache.missing(texts)
    asked = time.perf_counter() - asked
    cache.close()
    if left:
        raise RuntimeError(f"the job left {len(left)} texts unstored")
    return computed, ended - began, (rows - first[1]) / (ended - first[0]), asked


def _alone(model: str, store: str, texts: list[str]) -> float:
    """One process on a new store: the wall time of its call, the model loaded."""
    from embeddingcache import EmbeddingCache

    where = {"db_url": store} if "://" in store else {"cache_dir": store}
    with EmbeddingCache(model, device="cpu", remote_url=False, batch_size=256, **where) as cache:
        cache.dimension()  # the model loaded, as the team benchmark's processes have it
        began = time.perf_counter()
        cache.get_embeddings(texts + texts)
        return time.perf_counter() - began


def _setup(
    work: Path, quick: bool, *, seed: int, prefix: str
) -> tuple[str, list[str], str | None, str]:
    """The fast model, the job's distinct texts, the Postgres server's URL (``None``: SQLite
    folders) and the name of the kind of store."""
    model = str(static_model(work / "static-model"))
    texts = sentences(5_000 if quick else 20_000, seed=seed, prefix=prefix)
    admin = os.environ.get("EMBEDDING_CACHE_TEST_DB_URL")
    return model, texts, admin, "Postgres" if admin else "SQLite folder"


def ray_job(work: Path, quick: bool) -> list[Result]:
    import ray

    model, texts, admin, kind = _setup(work, quick, seed=2929, prefix="ray ")
    n = len(texts)
    drops: list[Callable[[], None]] = []
    ray.init(num_cpus=ACTORS + 1, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        alone = _alone(model, _store(work, "ray", "alone", admin, drops), texts)
        store = _store(work, "ray", "job", admin, drops)
        computed, together, rate, asked = _job(model, store, texts)
    finally:
        ray.shutdown()
        for drop in drops:
            drop()
    return [
        _result(
            f"a Ray Data job: {ACTORS} actors, {kind}",
            "map_batches(EmbedBatches)",
            n,
            (computed, together, alone),
            f"(actors starting and loading the model included) against {alone:.2f} s for one "
            f"process ({together / alone:.2f}x); once the first batch was back, the job ran at "
            f"{rate:,.0f} rows/s against {2 * n / alone:,.0f}/s for the process; then "
            f"missing() over the {n:,} texts took {asked:.2f} s to say that nothing is left",
        )
    ]


def _result(name: str, how: str, n: int, figures: tuple[int, float, float], detail: str) -> Result:
    """Benchmark 18's line for a job: ``figures`` are the texts it computed, its wall time
    and the one process's; the target is no text computed twice."""
    computed, together, alone = figures
    extra = computed - n
    return Result(
        f"18. {name}",
        f"{2 * n:,} rows, {n:,} distinct texts each twice, the fast model, {how} on a local "
        "cluster: wall time, and texts computed beyond the distinct ones",
        together,
        alone,
        "one process alone on the same texts, same run",
        together / alone,
        "0 computed twice",
        extra == 0,
        unit="s",
        notes=[
            f"{name.split(', ')[-1]}: {computed:,} texts computed for {n:,} distinct "
            f"({extra} twice); the job took {together:.2f} s {detail}"
        ],
    )


def _dask_job(model: str, stores: list[str], texts: list[str]) -> list[tuple[int, float]]:
    """The same rows as a Dask dataframe of 20 partitions on 2 worker processes, on each
    store in turn, on one cluster: texts computed in all, and the wall time (the first job's
    workers load the model; the next ones' have it)."""
    import dask.dataframe as dd
    import distributed
    import pandas as pd

    from embeddingcache import EmbeddingCache
    from embeddingcache.integrations.batches import EmbedColumn

    frame = dd.from_pandas(pd.DataFrame({"text": texts + texts}), npartitions=20)
    meta = frame._meta.assign(embedding=pd.Series([], dtype=object), computed=0)
    results = []
    with (
        distributed.LocalCluster(
            n_workers=ACTORS, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        for store in stores:
            where = {"db_url": store} if "://" in store else {"cache_dir": store}
            cache = EmbeddingCache(model, device="cpu", remote_url=False, batch_size=256, **where)
            embed = _counting(EmbedColumn)(cache)
            began = time.perf_counter()
            done = frame.map_partitions(embed, meta=meta).compute()
            results.append((int(done["computed"].sum()), time.perf_counter() - began))
            cache.close()
    return results


def dask_job(work: Path, quick: bool) -> list[Result]:
    model, texts, admin, kind = _setup(work, quick, seed=2930, prefix="dask ")
    n = len(texts)
    drops: list[Callable[[], None]] = []
    try:
        alone = _alone(model, _store(work, "dask", "alone", admin, drops), texts)
        stores = [_store(work, "dask", name, admin, drops) for name in ("job", "warm")]
        (computed, together), (warm_computed, warm) = _dask_job(model, stores, texts)
    finally:
        for drop in drops:
            drop()
    return [
        _result(
            f"a Dask job: {ACTORS} workers, {kind}",
            "map_partitions(EmbedColumn)",
            n,
            (max(computed, warm_computed), together, alone),
            f"(each worker loading the model included) against {alone:.2f} s for one process "
            f"({together / alone:.2f}x); the same job on a new store, on the same workers "
            f"(the model loaded): {warm:.2f} s, {warm_computed:,} computed",
        )
    ]
