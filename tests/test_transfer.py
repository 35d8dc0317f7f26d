"""export / import of one model shard through a portable file, on real SQLite files and a real
Postgres where one runs."""

from __future__ import annotations

import base64
import gzip
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embeddingcache import (
    DimensionMismatchError,
    EmbeddingCache,
    InvalidInputError,
    ShardMismatchError,
    StorageError,
    transfer,
)
from embeddingcache.cli import main
from embeddingcache.keys import key_of, keys_of, model_slug
from embeddingcache.models import resolve_model
from embeddingcache.storage import SQLiteLayout, Store
from embeddingcache.transfer import FORMAT, ExportReport, export_shard, import_file

TEXTS = [f"sentence number {i}" for i in range(30)]


def shard_name(model: str) -> str:
    """The name a shard records: a model folder's absolute path."""
    return resolve_model(model).name


def vector_bytes(store: Store, model: str, texts: list[str]) -> list[bytes]:
    found = store.lookup(model, keys_of(texts))
    assert len(found.positions) == len(texts)
    return [row.tobytes() for row in found.vectors]


def header(model: str = "m", dimension: int = 4, **changes: Any) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": 1,
        "model": model,
        "dimension": dimension,
        "dtype": "float32",
        "library_version": "0.1.0",
        **changes,
    }


def entry(text: str, vector: Any) -> dict[str, str]:
    blob = np.asarray(vector, dtype="<f4").tobytes()
    return {"text": text, "vector": base64.b64encode(blob).decode("ascii")}


def write_lines(path: Path, lines: list[Any]) -> Path:
    """A file of JSON lines; a str is written as it is, anything else as JSON."""
    rendered = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(rendered) + "\n", encoding="utf-8")
    return path


def valid_entries(n: int, dimension: int = 4) -> list[dict[str, str]]:
    rng = np.random.default_rng(0)
    return [entry(f"text {i}", rng.standard_normal(dimension)) for i in range(n)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """An empty SQLite store, the target of imports."""
    s = Store(SQLiteLayout(tmp_path / "target"))
    yield s
    s.close()


def assert_nothing_written(store: Store, model: str = "m") -> None:
    assert store.info(model) is None
    assert store.text_count() == 0


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["shard.jsonl", "shard.jsonl.gz"])
def test_a_shard_moved_through_a_file_is_served_bit_identical_from_the_cache_it_lands_in(
    cache: EmbeddingCache, tiny_model: str, tmp_path: Path, name: str
) -> None:
    """Export then import into a fresh cache gives the same bytes, as hits, computing nothing."""
    original = cache.get_embeddings(TEXTS)
    model = shard_name(tiny_model)
    path = tmp_path / name
    exported = export_shard(cache._store, model, path)
    assert exported == ExportReport(
        model, 32, written=len(TEXTS), skipped_no_text=0, skipped_inexact=0, skipped_damaged=0
    )
    with EmbeddingCache(tiny_model, cache_dir=tmp_path / "fresh", device="cpu") as fresh:
        imported = import_file(fresh._store, path)
        assert (imported.read, imported.added, imported.already_present) == (len(TEXTS), 30, 0)
        served = fresh.get_embeddings(TEXTS)
        assert fresh.stats["hits"] == len(TEXTS) and fresh.stats["computed"] == 0
    assert served.tobytes() == original.tobytes()


def test_a_gz_export_is_gzip_compressed_json_lines_with_the_header_first(
    cache: EmbeddingCache, tiny_model: str, tmp_path: Path
) -> None:
    """A name ending in .gz gives a gzip file whose first line is the header."""
    cache.get_embeddings(TEXTS[:3])
    path = tmp_path / "shard.jsonl.gz"
    export_shard(cache._store, shard_name(tiny_model), path)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = [json.loads(line) for line in file]
    assert lines[0] == header(
        shard_name(tiny_model), 32, library_version=lines[0]["library_version"]
    )
    assert sorted(line["text"] for line in lines[1:]) == sorted(TEXTS[:3])
    assert all(len(base64.b64decode(line["vector"])) == 4 * 32 for line in lines[1:])


def test_a_sqlite_shard_round_trips_through_postgres(
    cache: EmbeddingCache, tiny_model: str, tmp_path: Path, pg_url: str
) -> None:
    """A file exported from SQLite imports into Postgres and is served from there unchanged."""
    original = cache.get_embeddings(TEXTS)
    path = tmp_path / "shard.jsonl"
    export_shard(cache._store, shard_name(tiny_model), path)
    with EmbeddingCache(tiny_model, db_url=pg_url, device="cpu") as on_postgres:
        assert import_file(on_postgres._store, path).added == len(TEXTS)
        served = on_postgres.get_embeddings(TEXTS)
        assert on_postgres.stats["hits"] == len(TEXTS) and on_postgres.stats["computed"] == 0
    assert served.tobytes() == original.tobytes()


def test_an_export_from_postgres_skips_and_reports_a_text_stored_inexactly(
    tiny_model: str, tmp_path: Path, pg_url: str, capsys: Any
) -> None:
    """Postgres keeps NUL as U+FFFD, so that text cannot be exported; the CLI says so."""
    with EmbeddingCache(tiny_model, db_url=pg_url, device="cpu") as on_postgres:
        on_postgres.get_embeddings(["before\x00after", "plain text"])
        report = export_shard(on_postgres._store, shard_name(tiny_model), tmp_path / "a.jsonl")
    assert (report.written, report.skipped_inexact, report.skipped_no_text) == (1, 1, 0)
    out = tmp_path / "b.jsonl"
    assert main(["export", str(out), "-m", tiny_model, "--db-url", pg_url]) == 0
    assert capsys.readouterr().out.strip() == (
        f"exported 1 vectors of {shard_name(tiny_model)} (32-d) to {out}; "
        "skipped 1 whose text is not stored exactly (NUL on Postgres)"
    )
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["text"] for line in lines[1:]] == ["plain text"]


# -- never a mix ---------------------------------------------------------------------------


def test_an_import_keeps_every_vector_the_cache_already_holds(
    any_store: Store, tmp_path: Path
) -> None:
    """Entries already stored, or repeated in the file, count as present and change nothing."""
    held = np.full((1, 4), 7.0, dtype=np.float32)
    any_store.put("m", [key_of("text 1")], ["text 1"], held)
    entries = valid_entries(3)
    path = write_lines(tmp_path / "f.jsonl", [header(), *entries, entry("text 2", [9, 9, 9, 9])])
    report = import_file(any_store, path)
    assert (report.read, report.added, report.already_present) == (4, 2, 2)
    assert vector_bytes(any_store, "m", ["text 1"]) == [held.tobytes()]
    first_of_text_2 = base64.b64decode(entries[2]["vector"])
    assert vector_bytes(any_store, "m", ["text 0", "text 2"])[1] == first_of_text_2
    again = import_file(any_store, path)
    assert (again.added, again.already_present) == (0, 4)


def test_an_import_replaces_a_damaged_stored_vector(store: Store, tmp_path: Path) -> None:
    """A stored vector of the wrong length is the one vector an import overwrites."""
    store.put("m", [key_of("text 0")], ["text 0"], np.ones((1, 4), dtype=np.float32))
    shard = tmp_path / "target" / f"{model_slug('m')}.db"
    with sqlite3.connect(shard) as db:
        db.execute("UPDATE embedding SET vector = x'00'")
    db.close()
    entries = valid_entries(1)
    report = import_file(store, write_lines(tmp_path / "f.jsonl", [header(), *entries]))
    assert report.added == 1
    assert vector_bytes(store, "m", ["text 0"]) == [base64.b64decode(entries[0]["vector"])]


def test_a_file_of_another_dimension_than_the_shard_is_refused_and_writes_nothing(
    any_store: Store, tmp_path: Path
) -> None:
    """A 5-d file for a model whose shard holds 4-d vectors stores no text and no vector."""
    any_store.put("m", [key_of("held")], ["held"], np.ones((1, 4), dtype=np.float32))
    path = write_lines(tmp_path / "f.jsonl", [header(dimension=5), *valid_entries(3, 5)])
    with pytest.raises(DimensionMismatchError, match=r"5-d vectors of model 'm'.*holds 4-d"):
        import_file(any_store, path)
    assert any_store.text_count() == 1
    assert len(any_store.lookup("m", keys_of(["text 0", "text 1"])).positions) == 0


def test_a_file_of_a_model_whose_slug_collides_with_the_shards_is_refused(
    cache: EmbeddingCache, tiny_model: str, tmp_path: Path
) -> None:
    """A file naming another model than the one that owns the shard file is refused."""
    cache.get_embeddings(["owned by the tiny model"])
    impostor = model_slug(shard_name(tiny_model))  # a clean name equal to the tiny model's slug
    assert model_slug(impostor) == model_slug(shard_name(tiny_model))
    path = write_lines(tmp_path / "f.jsonl", [header(impostor, 32), *valid_entries(2, 32)])
    with pytest.raises(ShardMismatchError, match="belongs to model"):
        import_file(cache._store, path)
    assert cache._store.text_count() == 1


# -- damaged files -------------------------------------------------------------------------

GOOD = 2500  # more than one write batch: a one-pass import would have stored the first
BAD_LINE = GOOD + 2  # the header is line 1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "is not valid UTF-8 JSON"),
        ('["a", "list"]', "is not a JSON object"),
        ("   ", "is empty"),
        ({"text": "", "vector": entry("x", [0] * 4)["vector"]}, "'text' must be a non-empty"),
        ({"text": "\ud800", "vector": entry("x", [0] * 4)["vector"]}, "lone surrogate"),
        ({"text": "bad base64", "vector": "!!!!"}, "'vector' is not valid base64"),
        (entry("short", [1, 2, 3]), "'vector' holds 12 bytes, not 16"),
        (entry("not finite", [1, float("nan"), 3, 4]), "'vector' holds NaN or infinite"),
        (entry("infinite", [1, 2, float("inf"), 4]), "'vector' holds NaN or infinite"),
    ],
)
def test_a_damaged_line_is_refused_by_number_before_anything_is_written(
    store: Store, tmp_path: Path, bad: Any, message: str
) -> None:
    """A bad line after thousands of good ones fails the import naming it; nothing is stored."""
    path = write_lines(tmp_path / "f.jsonl", [header(), *valid_entries(GOOD), bad])
    with pytest.raises(InvalidInputError, match=rf"line {BAD_LINE}\b.*{message}") as caught:
        import_file(store, path)
    assert str(path) in str(caught.value)
    assert_nothing_written(store)


@pytest.mark.parametrize(
    ("first_line", "message"),
    [
        (header(format="something-else"), "has format 'something-else'"),
        (header(version=2), "has version 2; this embeddingcache reads version 1"),
        (header(version=True), "has version True"),
        (header(model=" "), "'model' must be a non-empty string"),
        (header(dimension=0), "'dimension' must be a positive integer"),
        (header(dimension="4"), "'dimension' must be a positive integer"),
        (header(dtype="float16"), "'dtype' must be 'float32'"),
        (entry("an entry", [0] * 4), "has format None"),
        ("{broken", "is not valid UTF-8 JSON"),
    ],
)
def test_a_bad_header_is_refused_as_line_1(
    store: Store, tmp_path: Path, first_line: Any, message: str
) -> None:
    """A header of another format, version, dtype or shape fails at line 1."""
    path = write_lines(tmp_path / "f.jsonl", [first_line, *valid_entries(2)])
    with pytest.raises(InvalidInputError, match=rf"line 1 \(the header\).*{message}"):
        import_file(store, path)
    assert_nothing_written(store)


def test_an_empty_file_and_a_broken_gzip_are_refused_by_name(store: Store, tmp_path: Path) -> None:
    """No header, a .gz that is not gzip, and a truncated gzip each fail with the file's name."""
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(InvalidInputError, match=f"{re.escape(str(empty))} is empty"):
        import_file(store, empty)
    not_gzip = write_lines(tmp_path / "plain.jsonl.gz", [header(), *valid_entries(2)])
    with pytest.raises(InvalidInputError, match=r"plain\.jsonl\.gz is not a readable gzip file"):
        import_file(store, not_gzip)
    packed = gzip.compress(
        write_lines(tmp_path / "f.jsonl", [header(), *valid_entries(50)]).read_bytes()
    )
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(InvalidInputError, match=r"cut\.jsonl\.gz is not a readable gzip file"):
        import_file(store, cut)
    assert_nothing_written(store)


# -- exports that cannot be made -----------------------------------------------------------


def test_exporting_a_model_with_nothing_stored_names_the_models_the_cache_holds(
    cache: EmbeddingCache, tiny_model: str, tmp_path: Path
) -> None:
    """Asking for a model the cache lacks fails, names what it has, and writes no file."""
    cache.get_embeddings(["something"])
    path = tmp_path / "none.jsonl"
    with pytest.raises(InvalidInputError, match=r"nothing stored for model 'other'.*it holds '"):
        export_shard(cache._store, "other", path)
    assert not path.exists()


def test_an_export_that_fails_midway_leaves_the_previous_file_and_no_partial_one(
    cache: EmbeddingCache, tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read error after the first chunk keeps the old file under the name, and no leftover."""
    cache.get_embeddings(TEXTS)
    path = tmp_path / "exports" / "shard.jsonl"
    path.parent.mkdir()
    path.write_text("the previous export\n", encoding="utf-8")
    real_entries = transfer.entries

    def failing_entries(store: Store, model: str) -> Iterator[Any]:
        chunks = real_entries(store, model)
        yield next(chunks)
        raise StorageError("the disk went away")  # the fault to inject

    monkeypatch.setattr("embeddingcache.storage.tables.READ_CHUNK", 10)
    monkeypatch.setattr(transfer, "entries", failing_entries)
    with pytest.raises(StorageError, match="the disk went away"):
        export_shard(cache._store, shard_name(tiny_model), path)
    assert [p.name for p in path.parent.iterdir()] == ["shard.jsonl"]
    assert path.read_text(encoding="utf-8") == "the previous export\n"


def test_an_export_in_small_chunks_writes_every_vector_once(
    cache: EmbeddingCache, tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keyset pagination over many chunks neither loses nor repeats a row."""
    cache.get_embeddings(TEXTS)
    monkeypatch.setattr("embeddingcache.storage.tables.READ_CHUNK", 7)
    path = tmp_path / "shard.jsonl"
    assert export_shard(cache._store, shard_name(tiny_model), path).written == len(TEXTS)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert sorted(line["text"] for line in lines[1:]) == sorted(TEXTS)


def test_an_export_leaves_out_and_counts_vectors_without_a_text_or_of_the_wrong_length(
    cache: EmbeddingCache, tiny_model: str, cache_dir: Path, tmp_path: Path
) -> None:
    """A vector whose text row is gone, and a damaged one, are skipped and counted."""
    cache.get_embeddings(["kept", "text lost", "vector damaged"])
    with sqlite3.connect(cache_dir / "hashstring.db") as db:
        db.execute("DELETE FROM hashstring WHERE text = 'text lost'")
    db.close()
    with sqlite3.connect(cache_dir / f"{model_slug(shard_name(tiny_model))}.db") as db:
        db.execute(
            "UPDATE embedding SET vector = x'0000' WHERE hashid = ?", [key_of("vector damaged")]
        )
    db.close()
    report = export_shard(cache._store, shard_name(tiny_model), tmp_path / "shard.jsonl")
    assert (report.written, report.skipped_no_text, report.skipped_damaged) == (1, 1, 1)


# -- the command line ----------------------------------------------------------------------


def test_the_command_line_exports_and_imports_a_shard_with_one_summary_line_each(
    cache: EmbeddingCache, tiny_model: str, cache_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    """export then import through main() print one line each, and a second import adds none."""
    cache.get_embeddings(TEXTS)
    model = shard_name(tiny_model)
    path = tmp_path / "shard.jsonl.gz"
    assert main(["export", str(path), "--model", tiny_model, "--cache-dir", str(cache_dir)]) == 0
    assert capsys.readouterr().out == f"exported 30 vectors of {model} (32-d) to {path}\n"
    target = ["--cache-dir", str(tmp_path / "target")]
    assert main(["import", str(path), *target]) == 0
    assert capsys.readouterr().out == (
        f"imported 30 vectors of {model} (32-d) from {path}: 30 new, 0 already stored\n"
    )
    assert main(["import", str(path), *target]) == 0
    assert "0 new, 30 already stored" in capsys.readouterr().out
    for command in ("export", "import"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--cache-dir" in capsys.readouterr().out


def test_command_line_transfer_errors_are_one_line_and_exit_1(
    cache: EmbeddingCache, tiny_model: str, cache_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    """A missing file, a bad gzip, bad JSON, an unknown model and a missing folder each print
    one line and exit 1, with no traceback."""
    cache.get_embeddings(["something"])
    capsys.readouterr()  # the model's loading bar
    target = ["--cache-dir", str(tmp_path / "target")]
    source = ["--cache-dir", str(cache_dir)]
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_text("hello\n", encoding="utf-8")
    bad_json = write_lines(tmp_path / "bad.jsonl", [header(), "{oops"])
    cases = [
        (["import", str(tmp_path / "missing.jsonl"), *target], "No such file"),
        (["import", str(not_gzip), *target], "is not a readable gzip file"),
        (["import", str(bad_json), *target], "line 2 is not valid UTF-8 JSON"),
        (["export", str(tmp_path / "x.jsonl"), "-m", "other", *source], "nothing stored for"),
        (["export", str(tmp_path / "no-dir" / "x.jsonl"), "-m", tiny_model, *source], "No such"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("embeddingcache: error: ") and err.count("\n") == 1, err
        assert message in err and "Traceback" not in err
