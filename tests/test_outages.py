"""A Postgres server that restarts or freezes under a cache (issue 30): docs/reliability.md,
promises 4 and 5.

The faults are real: a private server that these tests start themselves (initdb into a
temporary folder, a free port on 127.0.0.1) is stopped with ``pg_ctl stop -m immediate``
and started again, or stopped with SIGSTOP. The shared test server is never touched.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from embeddingcache import EmbeddingCache
from embeddingcache.errors import EmbeddingCacheWarning, InvalidInputError, StorageError
from embeddingcache.pipeline import StoreEvery
from embeddingcache.storage import retry, timeouts
from embeddingcache.storage.layout import server_schema


def _server_binaries() -> Path | None:
    """The newest Debian-style Postgres server binaries, else those on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parts[-3])
    on_path = shutil.which("initdb")
    return found[-1].parent if found else Path(on_path).parent if on_path else None


PG_BIN = _server_binaries()
# Small and fast: no fsync (the tests crash the server, never the machine), few buffers.
SETTINGS = (
    "-c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off "
    "-c shared_buffers=16MB -c max_connections=50"
)


def _as_postgres(*command: str) -> list[str]:
    """Postgres refuses to run as root: the tests run its tools as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


class PrivateServer:
    """A Postgres server of this module's own."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.port = port

    def pg_ctl(self, *args: str) -> None:
        assert PG_BIN is not None
        subprocess.run(
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args),
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        log = str(self.folder / "server.log")
        self.pg_ctl("-w", "-l", log, "-o", f"-p {self.port} {SETTINGS}", "start")

    def stop(self) -> None:
        self.pg_ctl("-m", "immediate", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database on this server."""
        import psycopg

        name = f"ec_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def processes(self) -> list[int]:
        """The postmaster and every process it started."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True, text=True
        ).stdout.split()
        return [postmaster, *map(int, children)]

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Every process of the server stopped (SIGSTOP), as a frozen machine would be."""
        stopped = self.processes()
        try:
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            yield
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivateServer]:
    """A Postgres server of this module's own on 127.0.0.1, stopped at the end whatever happens."""
    if PG_BIN is None:
        pytest.skip("no Postgres server binaries (initdb): cannot start a server of our own")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user: Postgres refuses root")
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start Postgres as postgres")
    folder = Path(tempfile.mkdtemp(prefix="embeddingcache-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    server = PrivateServer(folder, _free_port())
    try:
        initdb = [str(PG_BIN / "initdb"), "-D", str(server.data), "-U", "postgres"]
        subprocess.run(
            _as_postgres(*initdb, "-A", "trust", "--no-sync", "-E", "UTF8"),
            check=True,
            capture_output=True,
            timeout=120,
        )
        server.start()
        yield server
    finally:
        if (server.data / "postmaster.pid").exists():
            try:
                for pid in server.processes():
                    os.kill(pid, signal.SIGCONT)  # a test that failed while frozen
                server.stop()
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                print(f"could not stop the private Postgres in {folder}: {exc}")
        shutil.rmtree(folder, ignore_errors=True)


def _cache_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, EmbeddingCacheWarning)]


@pytest.mark.timeout(240)
def test_a_postgres_restart_in_the_middle_of_a_job_loses_no_vector(
    static_model: str, private_pg: PrivateServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3 s restart 4,000 vectors into a 20,000-text call: all 20,000 stored, no warning."""
    monkeypatch.setattr(retry, "WAIT_SCALE", 1.0)  # the real backoff: it rides the restart out
    url = private_pg.new_database()
    texts = [f"a text of a long job, number {i}" for i in range(20_000)]
    restarted = threading.Event()

    def restart_after(stored: int) -> None:
        import psycopg

        table = f"{server_schema(static_model)}.embedding"
        with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as watcher:
            while True:
                try:
                    if watcher.execute(f"SELECT count(*) FROM {table}").fetchone()[0] >= stored:
                        break
                except psycopg.errors.UndefinedTable:
                    pass  # not created yet
                time.sleep(0.005)
        private_pg.stop()
        time.sleep(3)
        private_pg.start()
        restarted.set()

    with EmbeddingCache(static_model, db_url=url, device="cpu") as cache:
        cache.get_embeddings(["the store worked"])
        cache.pipeline.store_every = StoreEvery(vectors=500, seconds=3600)  # 40 slices
        fault = threading.Thread(target=restart_after, args=(4000,), daemon=True)
        fault.start()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vectors = cache.get_embeddings(texts, batch_size=256)
        fault.join(60)
        assert restarted.is_set(), "the server was not restarted during the call"
        assert _cache_warnings(caught) == []
        assert cache.stats["computed"] == 1 + len(texts)
    with EmbeddingCache(static_model, db_url=url, device="cpu") as fresh:
        assert fresh.missing(texts) == []
        np.testing.assert_array_equal(fresh.get_embeddings(texts), vectors)
        assert fresh.stats["computed"] == 0


@pytest.mark.timeout(120)
def test_the_first_call_after_a_restart_neither_fails_nor_warns(
    static_model: str, private_pg: PrivateServer
) -> None:
    """After a restart, the next call reads and stores on new connections, without a warning."""
    url = private_pg.new_database()
    with EmbeddingCache(static_model, db_url=url, device="cpu") as cache:
        before = cache.get_embeddings([f"before {i}" for i in range(300)])
        private_pg.stop()
        private_pg.start()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = cache.get_embeddings([f"before {i}" for i in range(300)])
            cache.get_embeddings([f"after {i}" for i in range(300)])
        assert _cache_warnings(caught) == []
        np.testing.assert_array_equal(again, before)
        assert cache.stats["hits"] == 300 and cache.stats["computed"] == 600
    with EmbeddingCache(static_model, db_url=url, device="cpu") as fresh:
        assert fresh.missing([f"after {i}" for i in range(300)]) == []


# The small bounds of the freeze test, in seconds.
FROZEN_BOUNDS = {
    timeouts.ENV_CONNECT_TIMEOUT: "2",  # libpq's least
    timeouts.ENV_STATEMENT_TIMEOUT: "1",
    timeouts.ENV_LOCK_TIMEOUT: "1",
    timeouts.ENV_OUTAGE: "2",
}


@pytest.mark.timeout(120)
def test_a_frozen_postgres_costs_a_call_its_bounded_wait_then_heals(
    static_model: str, private_pg: PrivateServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGSTOPped server: right vectors and a warning within the bound; the next call stores."""
    from sentence_transformers import SentenceTransformer

    for name, value in FROZEN_BOUNDS.items():
        monkeypatch.setenv(name, value)
    bounds = timeouts.Timeouts.from_env()
    # The outage, then the wait in flight when it ends (the retries do not pause in tests).
    bound = bounds.outage_s + max(bounds.connect_timeout, bounds.cut_after)
    url = private_pg.new_database()
    texts = [f"a text computed while the database is frozen, number {i}" for i in range(500)]
    expected = SentenceTransformer(static_model, device="cpu").encode(texts)
    with EmbeddingCache(static_model, db_url=url, device="cpu") as cache:
        cache.get_embeddings(["the store worked", "and has connections open"])
        with private_pg.frozen():
            started = time.monotonic()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                vectors = cache.get_embeddings(texts)
            took = time.monotonic() - started
        print(f"frozen call: {took:.2f} s (bound {bound:g} s)")
        assert took < bound + 2.0, f"the call took {took:.1f} s, its bound is {bound:g} s"
        said = _cache_warnings(caught)
        assert any(m.startswith("could not store 500") and "not answered" in m for m in said)
        np.testing.assert_allclose(vectors, expected, atol=1e-6)
        # Past its outage the database is tried once in each OUTAGE_S: the next call after
        # that stores.
        time.sleep(bounds.outage_s)
        with warnings.catch_warnings(record=True) as healed:
            warnings.simplefilter("always")
            np.testing.assert_array_equal(cache.get_embeddings(texts), vectors)
        assert _cache_warnings(healed) == []
    with EmbeddingCache(static_model, db_url=url, device="cpu") as fresh:
        assert fresh.missing(texts) == []


@pytest.mark.timeout(60)
def test_a_database_never_reached_is_one_clear_error_at_once(
    tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused first connection is one StorageError at once, not an outage waited for."""
    monkeypatch.setattr(retry, "WAIT_SCALE", 1.0)
    url = f"postgresql://postgres@127.0.0.1:{_free_port()}/nowhere"
    with EmbeddingCache(tiny_model, db_url=url, device="cpu") as cache:
        started = time.monotonic()
        with pytest.raises(StorageError, match="Connection refused"):
            cache.get_embeddings(["never stored"])
        assert time.monotonic() - started < 1.0


def test_the_timeouts_are_set_on_every_connection_and_lifted_for_upkeep(
    tiny_model: str, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timeouts reach server and libpq, are lifted for upkeep, and bad values are refused."""
    monkeypatch.setenv(timeouts.ENV_STATEMENT_TIMEOUT, "7.5")
    monkeypatch.setenv(timeouts.ENV_LOCK_TIMEOUT, "3")
    monkeypatch.setenv(timeouts.ENV_CONNECT_TIMEOUT, "4")
    with EmbeddingCache(tiny_model, db_url=pg_url, device="cpu") as cache:
        cache.get_embeddings(["a text"])
        engine = cache._store.layout.text_place().engine
        show = "SELECT current_setting('statement_timeout'), current_setting('lock_timeout')"
        with engine.connect() as connection:
            assert tuple(connection.execute(text(show)).one()) == ("7500ms", "3s")
            libpq = connection.connection.dbapi_connection.info.get_parameters()
            assert libpq["connect_timeout"] == "4"
        with timeouts.unbounded(), engine.connect() as connection:
            assert tuple(connection.execute(text(show)).one()) == ("0", "0")
        with engine.connect() as connection:  # the same pooled connection, bounded again
            assert tuple(connection.execute(text(show)).one()) == ("7500ms", "3s")
    monkeypatch.setenv(timeouts.ENV_OUTAGE, "soon")
    with pytest.raises(InvalidInputError, match=timeouts.ENV_OUTAGE):
        EmbeddingCache(tiny_model, db_url=pg_url, device="cpu").get_embeddings(["x"])
