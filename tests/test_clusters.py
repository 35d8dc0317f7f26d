"""Big jobs on real local clusters (issue 29): Ray Data actors and Dask workers share one
store, compute each text once between them, and a rerun computes nothing; a Ray worker
killed mid-job is restarted and its batch retried, and nothing is lost. Each cluster starts
once for this module and is shut down even when a test fails; each test is bounded."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embeddingcache import EmbeddingCache
from embeddingcache.integrations.batches import EmbedColumn
from embeddingcache.pipeline.claims import ENV_CLAIM_LEASE

ray = pytest.importorskip("ray")
distributed = pytest.importorskip("distributed")

DISTINCT = 5_000
TEXTS = [f"document {i} of the cluster corpus, on topic {i % 97}" for i in range(DISTINCT)]
# Every text twice, 5,000 rows apart: in other blocks and partitions than its first time.
ROWS = [{"id": i, "text": TEXTS[i % DISTINCT]} for i in range(2 * DISTINCT)]
BLOCKS = 10
LEASE_S = "2"  # a dead worker's claims hold the others back this long at most

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def reference(static_model: str) -> np.ndarray:
    """The bare model's vectors of the distinct texts, computed without the cache."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(static_model, device="cpu")
    vectors: np.ndarray = model.encode(TEXTS, batch_size=1_000, convert_to_numpy=True)
    return vectors


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster with 4 logical CPUs on this machine's 2 cores."""
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {ENV_CLAIM_LEASE: LEASE_S}},
    )
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """A local Dask cluster of 2 worker processes, one thread each."""
    before = os.environ.get(ENV_CLAIM_LEASE)
    os.environ[ENV_CLAIM_LEASE] = LEASE_S  # the workers inherit it
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    try:
        with distributed.Client(cluster) as client:
            yield client
    finally:
        cluster.close()
        if before is None:
            del os.environ[ENV_CLAIM_LEASE]
        else:
            os.environ[ENV_CLAIM_LEASE] = before


def counting(base: type[EmbedColumn]) -> type[EmbedColumn]:
    """``base`` adding to each batch what it computed (on its first row) and the process
    that embedded it. Defined in a function, so that Ray and Dask pickle it by value."""

    class Counting(base):  # type: ignore[valid-type,misc]
        def __call__(self, batch: Any) -> Any:
            before = self.cache.stats["computed"]
            out = super().__call__(batch)
            rows = len(out["id"])
            computed = np.zeros(rows, dtype=np.int64)
            computed[0] = self.cache.stats["computed"] - before
            pids = np.full(rows, os.getpid())
            if isinstance(out, dict):
                out.update(computed=computed, pid=pids)
                return out
            return out.assign(computed=computed, pid=pids)

    return Counting


def _check_rows(rows: list[dict[str, Any]], reference: np.ndarray) -> int:
    """Every row has its text's vector, bit for bit; what the job computed in all."""
    rows = sorted(rows, key=lambda row: row["id"])
    assert [row["id"] for row in rows] == list(range(2 * DISTINCT))
    vectors = np.stack([np.asarray(row["embedding"]) for row in rows])
    assert np.array_equal(vectors, np.concatenate([reference, reference]))
    return int(sum(row["computed"] for row in rows))


def _ray_job(cache: EmbeddingCache, base: type[EmbedColumn]) -> list[dict[str, Any]]:
    dataset = ray.data.from_items(ROWS, override_num_blocks=BLOCKS)
    rows: list[dict[str, Any]] = dataset.map_batches(
        counting(base),
        fn_constructor_args=(cache,),
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=500,
        batch_format="numpy",
    ).take_all()
    return rows


def test_ray_actors_on_postgres_compute_each_text_once_and_a_rerun_nothing(
    ray_cluster: None, pg_url: str, static_model: str, reference: np.ndarray
) -> None:
    """10,000 rows, each text twice in different blocks, over 2 actors and one Postgres:
    every vector right, at most one computation per distinct text, none on a rerun, and
    nothing missing for the driver to send again."""
    from embeddingcache.integrations.ray import EmbedBatches

    cache = EmbeddingCache(static_model, db_url=pg_url)
    assert cache.missing(TEXTS) == TEXTS  # nothing stored yet: send everything
    computed = _check_rows(_ray_job(cache, EmbedBatches), reference)
    assert 0 < computed <= DISTINCT
    assert cache.missing(TEXTS) == []  # the driver has nothing left to send
    assert _check_rows(_ray_job(cache, EmbedBatches), reference) == 0
    cache.close()


def test_a_ray_function_closing_over_a_driver_cache_works(
    ray_cluster: None, cache_dir: Path, static_model: str, reference: np.ndarray
) -> None:
    """The natural closure over a cache built on the driver, on a SQLite folder the
    worker processes share: the right vectors in order."""
    cache = EmbeddingCache(static_model, cache_dir=cache_dir)

    def embed(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"id": batch["id"], "embedding": cache.get_embeddings(batch["text"].tolist())}

    dataset = ray.data.from_items(ROWS[:DISTINCT], override_num_blocks=4)
    rows = sorted(dataset.map_batches(embed, batch_size=500).take_all(), key=lambda r: r["id"])
    assert np.array_equal(np.stack([row["embedding"] for row in rows]), reference)
    assert cache.missing(TEXTS) == []


def test_a_ray_worker_killed_mid_job_is_retried_and_loses_nothing(
    ray_cluster: None, pg_url: str, static_model: str, reference: np.ndarray, tmp_path: Path
) -> None:
    """An actor dies after computing a batch and before storing it, its claims held: Ray
    restarts it and retries the batch; the others wait one lease at most for its texts.
    Every vector is right, the survivors computed each text at most once, and a rerun
    computes nothing."""
    from embeddingcache.integrations.ray import EmbedBatches

    marker = tmp_path / "died"

    class DiesOnce(EmbedBatches):
        def __call__(self, batch: Any) -> Any:
            if 2_600 in batch["id"] and not marker.exists():
                marker.write_text(str(os.getpid()))

                def die(*args: object, **kwargs: object) -> None:
                    os._exit(1)  # the fault: the process ends, claims held, nothing stored

                self.cache.pipeline.writer.store_rows = die  # type: ignore[method-assign]
            return super().__call__(batch)

    cache = EmbeddingCache(static_model, db_url=pg_url)
    rows = _ray_job(cache, DiesOnce)
    assert marker.exists()  # the fault fired
    died = int(marker.read_text())
    retried = next(row for row in rows if row["id"] == 2_600)
    assert retried["pid"] != died  # another process embedded the batch
    assert _check_rows(rows, reference) <= DISTINCT
    assert cache.missing(TEXTS) == []
    assert _check_rows(_ray_job(cache, EmbedBatches), reference) == 0
    cache.close()


def test_dask_partitions_on_postgres_compute_each_text_once_and_a_rerun_nothing(
    dask_client: Any, pg_url: str, static_model: str, reference: np.ndarray
) -> None:
    """The same 10,000 rows as a Dask dataframe of 10 partitions over 2 workers."""
    import dask.dataframe as dd
    import pandas as pd

    cache = EmbeddingCache(static_model, db_url=pg_url)
    frame = dd.from_pandas(pd.DataFrame(ROWS), npartitions=BLOCKS)
    embed = counting(EmbedColumn)(cache)
    meta = frame._meta.assign(embedding=pd.Series([], dtype=object), computed=0, pid=0)

    def run() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = (
            frame.map_partitions(embed, meta=meta).compute().to_dict("records")
        )
        return rows

    assert 0 < _check_rows(run(), reference) <= DISTINCT
    assert cache.missing(TEXTS) == []
    assert _check_rows(run(), reference) == 0
    cache.close()


def test_dask_bags_dataframes_and_client_map_take_the_cache_in_one_line(
    dask_client: Any, cache_dir: Path, static_model: str, reference: np.ndarray
) -> None:
    """``embed_bag``, ``embed_dataframe`` and ``client.map(cache.get_embeddings, ...)``
    give the model's vectors in order, on a SQLite folder the workers share."""
    import dask.bag as db
    import dask.dataframe as dd
    import pandas as pd

    from embeddingcache.integrations.dask import embed_bag, embed_dataframe

    cache = EmbeddingCache(static_model, cache_dir=cache_dir)
    chunks = [TEXTS[start : start + 1_000] for start in range(0, DISTINCT, 1_000)]
    mapped = dask_client.gather(dask_client.map(cache.get_embeddings, chunks))
    assert np.array_equal(np.vstack(mapped), reference)
    bag = db.from_sequence(TEXTS, npartitions=4)
    assert np.array_equal(np.vstack(embed_bag(bag, cache).compute()), reference)
    frame = dd.from_pandas(pd.DataFrame({"body": TEXTS}), npartitions=4)
    embedded = embed_dataframe(frame, cache, column="body", output_column="vector").compute()
    assert list(embedded["body"]) == TEXTS
    assert np.array_equal(np.stack(embedded["vector"].to_list()), reference)
