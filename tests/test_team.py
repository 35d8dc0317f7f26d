"""One computation per text across every process that shares a store (issue 28): claims in
the store, waiting for another's claim, leases that outlive a dead holder by one lease at
most, on SQLite and on Postgres."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embeddingcache import EmbeddingCache
from embeddingcache.models import resolve_model
from embeddingcache.pipeline import claims as claims_module
from embeddingcache.storage import Store, layout_for
from embeddingcache.storage.claims import ClaimTable

WORKER = Path(__file__).with_name("team_worker.py")
TEXTS = [f"text number {i} of the team's corpus" for i in range(240)]


def _store_of(storage: dict[str, Any]) -> str:
    return str(storage.get("db_url") or storage["cache_dir"])


class Team:
    """Worker processes started together (a start file is their barrier), each its own
    cache over one store; their results once they end."""

    def __init__(self, model: str, store: str, folder: Path, texts: list[str]) -> None:
        self.model, self.store, self.folder = model, store, folder
        self.texts_file = folder / "texts.json"
        self.texts_file.write_text(json.dumps(texts), encoding="utf-8")
        self.start_file = folder / "start"
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, *, slow: float = 0.0, lease: float | None = None) -> Any:
        env = dict(os.environ)
        if lease is not None:
            env[claims_module.ENV_CLAIM_LEASE] = str(lease)
        args = [self.model, self.store, str(self.texts_file), str(self.start_file)]
        process = subprocess.Popen(
            [sys.executable, str(WORKER), *args, str(self.folder / name), str(slow)], env=env
        )
        self.processes.append(process)
        return process

    def ready(self, *names: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not all((self.folder / f"{n}.ready").exists() for n in names):
            assert time.monotonic() < deadline, "the workers did not start"
            assert all(p.poll() in (None, 0) for p in self.processes), "a worker failed"
            time.sleep(0.05)

    def start(self) -> None:
        self.start_file.write_text("go")

    def result(self, name: str) -> tuple[list[str], np.ndarray, dict[str, int]]:
        report = json.loads((self.folder / f"{name}.json").read_text())
        return report["computed"], np.load(self.folder / f"{name}.npy"), report["stats"]

    def wait(self, timeout: float = 180.0) -> None:
        for process in self.processes:
            assert process.wait(timeout) == 0

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def team(tmp_path: Path) -> Any:
    teams: list[Team] = []

    def make(model: str, store: str, texts: list[str] = TEXTS) -> Team:
        teams.append(Team(model, store, tmp_path, texts))
        return teams[-1]

    yield make
    for made in teams:
        made.stop()


def test_processes_started_together_compute_each_text_once(
    team: Callable[..., Team], tiny_model: str, storage: dict[str, Any], direct_model: Any
) -> None:
    """Three processes behind a barrier, the same texts, one store: every text is computed
    once in all, and every process gets the same vectors, the model's own."""
    names = ["a", "b", "c"]
    made = team(tiny_model, _store_of(storage))
    for name in names:
        made.spawn(name)
    made.ready(*names)
    made.start()
    made.wait()
    results = [made.result(name) for name in names]
    computed = [text for done, _, _ in results for text in done]
    assert sorted(computed) == sorted(TEXTS)  # each once, by one process or another
    expected = direct_model.encode(TEXTS, convert_to_numpy=True)
    for _, vectors, stats in results:
        np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(vectors, results[0][1])  # the stored ones, bit for bit
        assert stats["computed"] + stats["waited"] == len(TEXTS)


def test_a_killed_claimer_delays_the_others_by_one_lease_at_most(
    team: Callable[..., Team], tiny_model: str, storage: dict[str, Any], direct_model: Any
) -> None:
    """A process SIGKILLed while it computes the texts it claimed: another that waits for
    them takes them over once the lease ends, and computes exactly what was not stored."""
    lease = 2.0
    made = team(tiny_model, _store_of(storage))
    slow = made.spawn("slow", slow=0.5, lease=lease)  # 15 slices of 16: 7.5 s
    made.ready("slow")
    made.start()
    with EmbeddingCache(tiny_model, device="cpu", remote_url=False, **storage) as probe:
        deadline = time.monotonic() + 60
        while probe.contents().shards == [] or not _stored(probe):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    os.environ[claims_module.ENV_CLAIM_LEASE] = str(lease)
    try:
        with EmbeddingCache(tiny_model, device="cpu", remote_url=False, **storage) as waiter:
            started = time.monotonic()
            vectors = waiter.get_embeddings(TEXTS)
            took = time.monotonic() - started
            stats = waiter.stats
    finally:
        del os.environ[claims_module.ENV_CLAIM_LEASE]
    np.testing.assert_allclose(
        vectors, direct_model.encode(TEXTS, convert_to_numpy=True), rtol=1e-5, atol=1e-6
    )
    assert 0 < stats["hits"] < len(TEXTS)  # what the killed process stored is not redone
    assert stats["computed"] == len(TEXTS) - stats["hits"]
    assert took < lease + 30  # the lease, then its own compute of a tiny model


def _stored(cache: EmbeddingCache) -> bool:
    return any(shard.entries > 0 for shard in cache.contents().shards)


def test_a_slow_claimer_that_is_alive_is_waited_for_not_duplicated(
    team: Callable[..., Team], tiny_model: str, storage: dict[str, Any]
) -> None:
    """Its lease is renewed while it works: a second process waits past several leases and
    computes nothing."""
    made = team(tiny_model, _store_of(storage), TEXTS[:40])  # 3 slices of 0.8 s
    made.spawn("slow", slow=0.8, lease=1.0)
    made.ready("slow")
    made.start()
    time.sleep(0.5)  # the slow one claims first
    made.spawn("patient", lease=1.0)
    made.ready("patient")
    made.wait()
    slow_computed, slow_vectors, _ = made.result("slow")
    patient_computed, patient_vectors, stats = made.result("patient")
    assert sorted(slow_computed) == sorted(TEXTS[:40]) and patient_computed == []
    assert stats["waited"] + stats["hits"] == 40
    np.testing.assert_array_equal(patient_vectors, slow_vectors)


def test_two_threads_with_the_same_texts_compute_each_once_and_disjoint_ones_do_not_wait(
    tiny_model: str, cache_dir: Path, encode_spy: Any
) -> None:
    """Per text, not per model: two caches in one process."""
    barrier = threading.Barrier(2)
    results: dict[str, np.ndarray] = {}

    def embed(name: str, texts: list[str]) -> None:
        with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
            cache.dimension()
            barrier.wait()
            results[name] = cache.get_embeddings(texts)

    threads = [threading.Thread(target=embed, args=(n, TEXTS[:80])) for n in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(t for call in encode_spy.calls for t in call) == sorted(TEXTS[:80])
    np.testing.assert_array_equal(results["a"], results["b"])

    # Disjoint texts: neither claims the other's, so neither waits (both compute their own).
    encode_spy.calls.clear()
    halves = {"a": TEXTS[80:160], "b": TEXTS[160:240]}
    threads = [threading.Thread(target=embed, args=(n, halves[n])) for n in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(t for call in encode_spy.calls for t in call) == sorted(TEXTS[80:240])


def test_claims_of_a_dead_process_do_not_pile_up(tiny_model: str, cache_dir: Path) -> None:
    """A claim never let go ends with its lease and is cleared one lease later by the next
    claimer: the table holds the claims of the last two leases at most."""
    store = Store(layout_for(cache_dir, None))
    table = ClaimTable(store)
    shard = resolve_model(tiny_model).name
    keys = [bytes([i]) * 64 for i in range(1, 50)]
    try:
        for i in range(5):  # five dead holders, one after the other
            assert table.claim(shard, keys[i * 5 : i * 5 + 5], lease_s=0.2).won.all()
        assert table.count(shard) == 5
        assert table.held(shard, keys[:25]).all()
        time.sleep(0.5)  # past their leases, and one more
        assert not table.held(shard, keys[:25]).any()
        again = table.claim(shard, keys[:5], lease_s=0.2)
        assert again.won.all() and not again.recheck.any()  # markers past their use: gone
        assert table.count(shard) == 1
    finally:
        store.close()


def test_a_claim_that_ended_lately_makes_the_next_claimer_look_again(
    tiny_model: str, cache_dir: Path
) -> None:
    store = Store(layout_for(cache_dir, None))
    table = ClaimTable(store)
    shard = resolve_model(tiny_model).name
    keys = [bytes([i]) * 64 for i in range(1, 9)]
    try:
        first = table.claim(shard, keys[:4], lease_s=30)
        second = table.claim(shard, keys, lease_s=30)
        assert second.won.tolist() == [False] * 4 + [True] * 4  # the first holds its four
        table.release(shard, first.owner)
        third = table.claim(shard, keys, lease_s=30)
        assert third.won.tolist() == [True] * 4 + [False] * 4
        assert third.recheck.tolist() == [True] * 4 + [False] * 4  # stored meanwhile?
        table.release(shard, third.owner)
        fourth = table.claim(shard, keys[:4], lease_s=30, since=time.time())
        assert fourth.won.all() and not fourth.recheck.any()  # let go before its lookup
    finally:
        store.close()


def test_two_serve_replicas_over_one_postgres_compute_each_text_once(
    start_server: Any, pg_url: str, tiny_model: str, tmp_path: Path, encode_spy: Any
) -> None:
    """Two backends over one database, two clients each, the same texts at once: each text is
    computed once by one replica, and every client counts them as the backend's."""
    replicas = [start_server(storage={"db_url": pg_url}) for _ in range(2)]
    barrier = threading.Barrier(4)
    results: dict[int, np.ndarray] = {}
    stats: dict[int, dict[str, int]] = {}

    def client(i: int) -> None:
        server = replicas[i % 2][0]
        with EmbeddingCache(
            tiny_model,
            cache_dir=tmp_path / f"client-{i}",
            remote_url=server.url,
            fallback_providers=("remote",),
        ) as cache:
            barrier.wait()
            results[i] = cache.get_embeddings(TEXTS)
            stats[i] = cache.stats

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(t for call in encode_spy.calls for t in call) == sorted(TEXTS)
    for i in range(4):
        np.testing.assert_array_equal(results[i], results[0])
        assert stats[i]["computed"] == 0
        assert stats[i]["remote_hits"] + stats[i]["remote_computed"] == len(TEXTS)
    served = [backend.stats() for _, backend in replicas]
    assert sum(s["computed"] for s in served) == len(TEXTS)
