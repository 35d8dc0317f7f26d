"""What the cache saved, in tokens: each computed vector's cost recorded on the write path,
the recorded cost of each hit added up per model, and reported by `stats`, the CLI and the
server (issue 16, item 4).

Only an engine whose tokens cost money is counted (`Engine.bills_tokens`). The tests make the
real tiny sentence-transformers engine such an engine by giving it what an API engine declares
(it bills, and its limits), so that its real tokenizer does the counting; nothing else about it
is changed.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from sqlalchemy import text

from embeddingcache import EmbeddingCache
from embeddingcache.cli import _usd, main
from embeddingcache.engines import Limits
from embeddingcache.keys import key_of
from embeddingcache.models import resolve_model
from embeddingcache.storage import Store, layout_for, migrate
from embeddingcache.tokens import estimate

TEXTS = ["the first text", "a second one, a little longer", "and a third", "ünïcödé ✓"]
BILLED = Limits(batch_inputs=32, token_budget=300_000)  # what an API engine declares


def billing(cache: EmbeddingCache, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The cache's engine for its model, made one that bills by the token."""
    engine = cache.pipeline.engine(resolve_model(cache.model))
    monkeypatch.setattr(engine, "limits", BILLED)
    monkeypatch.setattr(engine, "bills_tokens", True)
    return engine


def tokenizer_counts(direct_model: Any, texts: list[str]) -> list[int]:
    encoded = direct_model.tokenizer(texts, add_special_tokens=False)
    return [len(ids) for ids in encoded["input_ids"]]


def shard_rows(cache_dir: Path) -> list[tuple[Any, ...]]:
    """``(tokens, tokens_exact)`` of every vector of the one model shard, read with sqlite3."""
    (path,) = [p for p in cache_dir.glob("*.db") if p.name != "hashstring.db"]
    with sqlite3.connect(path) as db:
        return db.execute("SELECT tokens, tokens_exact FROM embedding ORDER BY tokens").fetchall()


def test_a_billing_engine_records_its_tokenizers_exact_count_for_each_vector(
    tiny_model: str, cache_dir: Path, direct_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        billing(cache, monkeypatch)
        cache.get_embeddings(TEXTS)
        expected = tokenizer_counts(direct_model, TEXTS)
        assert cache.stats["tokens_computed"] == sum(expected)
        assert cache.stats["tokens_saved"] == 0
        (shard,) = cache.contents().shards
    assert sorted(expected) == [tokens for tokens, _ in shard_rows(cache_dir)]
    assert {exact for _, exact in shard_rows(cache_dir)} == {1}
    assert (shard.tokens_counted, shard.tokens, shard.tokens_estimated) == (4, sum(expected), 0)


def test_an_engine_without_a_tokenizer_records_an_estimate_flagged_as_one(
    tiny_model: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        engine = billing(cache, monkeypatch)
        monkeypatch.setattr(engine, "count_tokens", lambda spec, texts: None)
        cache.get_embeddings(TEXTS)
        (shard,) = cache.contents().shards
    by_bytes = [math.ceil(len(t.encode("utf-8")) / 4) for t in TEXTS]
    assert estimate(TEXTS) == by_bytes
    assert shard_rows(cache_dir) == [(n, 0) for n in sorted(by_bytes)]
    assert shard.tokens == shard.tokens_estimated == sum(by_bytes)


def test_a_local_model_records_no_counts_and_its_hits_save_none(
    tiny_model: str, cache_dir: Path
) -> None:
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        cache.get_embeddings(TEXTS)
        cache.get_embeddings(TEXTS)
        assert cache.stats["tokens_computed"] == cache.stats["tokens_saved"] == 0
        (shard,) = cache.contents().shards
    assert shard_rows(cache_dir) == [(None, None)] * 4
    assert (shard.tokens_counted, shard.tokens, shard.tokens_saved) == (0, 0, 0)


def test_a_warm_run_saves_exactly_the_tokens_the_cold_run_counted(
    tiny_model: str, storage: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with EmbeddingCache(tiny_model, device="cpu", **storage) as cold:
        billing(cold, monkeypatch)
        computed = cold.get_embeddings(TEXTS)
        paid = cold.stats["tokens_computed"]
    assert paid > 0
    for run in (1, 2):
        with EmbeddingCache(tiny_model, device="cpu", **storage) as warm:
            np.testing.assert_array_equal(warm.get_embeddings(TEXTS), computed)
            np.testing.assert_array_equal(warm.get_embeddings([TEXTS[0]]), computed[:1])
            one = warm.stats["tokens_saved"] - paid
            assert warm.stats["computed"] == 0 and one > 0
        with EmbeddingCache(tiny_model, device="cpu", **storage) as reader:
            (shard,) = reader.contents().shards
        # Each warm run's hits were added to the shard's counter when it closed.
        assert shard.tokens_saved == run * (paid + one)
        assert shard.tokens == paid and shard.tokens_counted == len(TEXTS)


def test_stats_on_the_command_line_shows_the_tokens_and_what_they_were_worth(
    tiny_model: str,
    cache_dir: Path,
    direct_model: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        billing(cache, monkeypatch)
        cache.get_embeddings(TEXTS)
        cache.get_embeddings(TEXTS)
    paid = sum(tokenizer_counts(direct_model, TEXTS))
    assert main(["stats", "--cache-dir", str(cache_dir), "--price-per-million", "20"]) == 0
    out = capsys.readouterr().out
    worth = f"${paid * 20 / 1e6:.8f}".rstrip("0") + " at $20 per million"
    assert f"  tokens: {paid} for 4 vectors (exact); {paid} saved by hits ({worth})" in out
    monkeypatch.setenv("EMBEDDING_CACHE_PRICE_PER_MILLION", "0.02")
    assert main(["stats", "--cache-dir", str(cache_dir)]) == 0
    assert f"{paid} saved by hits ($0.00000" in capsys.readouterr().out
    assert (_usd(1234.5), _usd(0), _usd(0.00000044)) == ("$1,234.50", "$0.00", "$0.00000044")
    monkeypatch.setenv("EMBEDDING_CACHE_PRICE_PER_MILLION", "cheap")
    assert main(["stats", "--cache-dir", str(cache_dir)]) == 1
    err = capsys.readouterr().err
    assert "$EMBEDDING_CACHE_PRICE_PER_MILLION must be a number of USD >= 0, not 'cheap'" in err
    monkeypatch.delenv("EMBEDDING_CACHE_PRICE_PER_MILLION")
    assert main(["stats", "--cache-dir", str(cache_dir), "--price-per-million", "-1"]) == 1
    assert "the price per million tokens must be" in capsys.readouterr().err


def test_stats_says_when_a_model_is_not_counted(
    tiny_model: str, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        cache.get_embeddings(TEXTS)
    assert main(["stats", "--cache-dir", str(cache_dir), "--price-per-million", "20"]) == 0
    assert "  tokens: not counted (a local model" in capsys.readouterr().out


def test_the_servers_stats_report_the_tokens_computed_and_saved_per_model(
    start_server: Any, tiny_model: str, direct_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, backend = start_server()
    billing(backend.cache, monkeypatch)
    for _ in range(2):
        answer = httpx.post(
            f"{server.url}/embed",
            content=msgpack.packb({"texts": TEXTS}),
            headers={"Content-Type": "application/msgpack"},
            timeout=30,
        )
        assert answer.status_code == 200
    paid = sum(tokenizer_counts(direct_model, TEXTS))
    stats = httpx.get(f"{server.url}/stats").json()
    assert stats["tokens_computed"] == stats["tokens_saved"] == paid
    assert stats["tokens"] == {resolve_model(tiny_model).name: {"computed": paid, "saved": paid}}


def test_a_shard_made_at_s0003_is_upgraded_with_null_counts_and_nothing_lost(
    storage: dict[str, Any], upgrade_to: Any
) -> None:
    vectors = (np.arange(3 * 8, dtype=np.float32).reshape(3, 8) / 7).astype(np.float32)
    texts = ["old one", "old two", "old three"]
    where = Path(storage.get("cache_dir", "unused"))
    layout = layout_for(where, storage.get("db_url"))
    layout.prepare()
    place = layout.shard_place("legacy-model")
    prefix = "" if place.schema is None else f'"{place.schema}".'
    with place.engine.begin() as connection:
        upgrade_to(connection, place.schema, "s0003")
        connection.execute(
            text(
                f"INSERT INTO {prefix}model_info VALUES "
                "(1, 'legacy-model', 8, 'float32', '0.1.0', 0, NULL, 7, 2)"
            )
        )
        connection.execute(
            text(f"INSERT INTO {prefix}embedding VALUES (:k, :v, 0, 0)"),
            [{"k": key_of(t), "v": v.tobytes()} for t, v in zip(texts, vectors, strict=True)],
        )
    layout.close()
    store = Store(layout_for(where, storage.get("db_url")))
    found = store.lookup("legacy-model", [key_of(t) for t in texts])
    assert sorted(found.positions) == [0, 1, 2] and found.tokens == 0
    np.testing.assert_array_equal(found.vectors, vectors[found.positions])
    store.record("legacy-model", 3, 0, found.tokens)
    store.flush()
    (shard,) = store.summaries()
    assert (shard.entries, shard.hits, shard.misses) == (3, 10, 2)
    assert (shard.tokens_counted, shard.tokens, shard.tokens_saved) == (0, 0, 0)
    store.close()
    with place.engine.connect() as connection:
        assert (
            connection.scalar(text(f"SELECT version_num FROM {prefix}alembic_version"))
            == (migrate.HEADS["shard"])
        )
        assert (
            connection.execute(text(f"SELECT tokens, tokens_exact FROM {prefix}embedding")).all()
            == [(None, None)] * 3
        )
    place.engine.dispose()


def test_vectors_the_team_backend_computed_are_uncounted_here_and_counted_there(
    start_server: Any,
    tiny_model: str,
    tmp_path: Path,
    direct_model: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, backend = start_server()
    billing(backend.cache, monkeypatch)
    here = tmp_path / "client"
    with EmbeddingCache(
        tiny_model, cache_dir=here, remote_url=server.url, fallback_providers=("remote",)
    ) as client:
        client.get_embeddings(TEXTS)
        assert client.stats["remote_computed"] == 4 and client.stats["tokens_computed"] == 0
    assert shard_rows(here) == [(None, None)] * 4  # what they cost was paid by the backend
    paid = sum(tokenizer_counts(direct_model, TEXTS))
    assert httpx.get(f"{server.url}/stats").json()["tokens_computed"] == paid


def test_a_process_that_opened_a_shard_before_it_counted_reads_its_counts_after_a_flush(
    tiny_model: str, cache_dir: Path, direct_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as reader:
        reader.get_embeddings(["an uncounted text"])  # the shard is open here, not counting
        with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as writer:
            billing(writer, monkeypatch)
            writer.get_embeddings(TEXTS)
        reader.get_embeddings(TEXTS)
        assert reader.stats["tokens_saved"] == 0  # its copy of the model row says "none"
        reader.pipeline.storage.flush()  # what a running process does once a minute
        reader.get_embeddings(TEXTS)
        assert reader.stats["tokens_saved"] == sum(tokenizer_counts(direct_model, TEXTS))
