"""The command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from embeddingcache import __version__
from embeddingcache.cli import main

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embeddingcache.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
        check=False,
    )


def test_embed_a_file_twice_computes_it_once(
    tiny_model: str, cache_dir: Path, tmp_path: Path, direct_model: Any
) -> None:
    lines = ["first line", "second line", "first line", "third"]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "vectors.npy"
    args = ("embed", str(source), "--model", tiny_model, "--cache-dir", str(cache_dir))
    first = cli(*args, "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert "4 texts (3 distinct)" in first.stdout
    assert "0 from the cache, 0 from the backend, 3 computed" in first.stdout
    vectors = np.load(out)
    np.testing.assert_allclose(vectors, direct_model.encode(lines), atol=1e-5)
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert "3 from the cache, 0 from the backend, 0 computed" in second.stdout


def test_embed_reads_standard_input(tiny_model: str, cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "stdin.npy"
    result = cli(
        "embed",
        "-",
        "-m",
        tiny_model,
        "--cache-dir",
        str(cache_dir),
        "-o",
        str(out),
        stdin="alpha\nbeta\n",
    )
    assert result.returncode == 0, result.stderr
    assert np.load(out).shape == (2, 32)


def test_long_input_shows_a_progress_bar_on_stderr(
    tiny_model: str, cache_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "long.txt"
    source.write_text("\n".join(f"line {i}" for i in range(1100)), encoding="utf-8")
    result = cli("embed", str(source), "-m", tiny_model, "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert "1100/1100" in result.stderr
    assert "1100 computed" in result.stdout


def test_stats_lists_each_shard(tiny_model: str, cache_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "t.txt"
    source.write_text("one\ntwo\n", encoding="utf-8")
    assert (
        cli("embed", str(source), "-m", tiny_model, "--cache-dir", str(cache_dir)).returncode == 0
    )
    result = cli("stats", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert "texts: 2" in result.stdout
    assert f"{tiny_model}: 2 vectors, 32-d" in result.stdout


def test_errors_are_one_line_and_a_non_zero_exit(
    tiny_model: str, cache_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_text("ok\n\nstill ok\n", encoding="utf-8")
    assert main(["embed", str(blank), "-m", tiny_model, "--cache-dir", str(cache_dir)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"embeddingcache: error: {blank}: line 2 is empty; one text per line"
    assert main(["embed", str(tmp_path / "missing.txt"), "--cache-dir", str(cache_dir)]) == 1
    assert "No such file" in capsys.readouterr().err
    long = tmp_path / "long.txt"
    long.write_text("z " * 100 + "\n", encoding="utf-8")
    assert main(["embed", str(long), "-m", tiny_model, "--cache-dir", str(cache_dir)]) == 1
    err = capsys.readouterr().err
    assert "texts[0]: text is 102 tokens long, more than the 64" in err and "Traceback" not in err


def test_stats_on_an_empty_cache(tmp_path: Path, capsys: Any) -> None:
    assert main(["stats", "--cache-dir", str(tmp_path / "nothing")]) == 0
    assert "no model shards yet" in capsys.readouterr().out


def test_serve_answers_what_embed_asks_through_remote_url(
    tiny_model: str, cache_dir: Path, tmp_path: Path, serve_process: Any
) -> None:
    import httpx

    server = serve_process("-m", tiny_model, "--cache-dir", str(tmp_path / "server"))
    lines = ["asked once", "asked twice"]
    response = httpx.post(f"{server.url}/embed", json={"texts": lines}, timeout=60)
    assert response.status_code == 200
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ("embed", str(source), "-m", tiny_model, "--cache-dir", str(cache_dir))
    result = cli(*args, "--remote-url", server.url)
    assert result.returncode == 0, result.stderr
    assert "0 from the cache, 2 from the backend, 0 computed" in result.stdout


def test_serve_has_help_for_every_option() -> None:
    result = cli("serve", "--help")
    assert result.returncode == 0
    for option in (
        "--host",
        "--port",
        "--model",
        "--token",
        "--allow-push",
        "--max-texts",
        "--max-text-chars",
        "--max-body-bytes",
        "--cache-dir",
        "--db-url",
        "--base-url",
        "--api-key-env",
        "--truncate",
        "--cors-origin",
        "--header-timeout",
        "--body-timeout",
        "--keep-alive",
        "--max-connections",
        "--access-log",
    ):
        assert option in result.stdout


def test_serve_errors_are_one_line(tiny_model: str, tmp_path: Path, capsys: Any) -> None:
    cache = ["--cache-dir", str(tmp_path / "server")]
    assert main(["serve", "-m", str(tmp_path / "no-such-model"), *cache]) == 1
    err = capsys.readouterr().err
    assert err.startswith("embeddingcache: error: cannot load model") and err.count("\n") == 1
    assert main(["serve", "-m", tiny_model, "--max-texts", "0", *cache]) == 1
    assert "--max-texts must be at least 1" in capsys.readouterr().err
    assert main(["serve", "-m", tiny_model, "--header-timeout", "0", *cache]) == 1
    assert "--header-timeout must be more than 0" in capsys.readouterr().err
    from embeddingcache.server import bind

    with bind("127.0.0.1", 0) as taken:
        port = str(taken.getsockname()[1])
        assert main(["serve", "-m", tiny_model, "--port", port, *cache]) == 1
    err = capsys.readouterr().err
    assert "embeddingcache: error:" in err and "in use" in err


def test_embed_writes_json_lines_to_a_file_or_to_standard_output(
    tiny_model: str, cache_dir: Path, tmp_path: Path, direct_model: Any
) -> None:
    import json

    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("alpha\nbeta\n", encoding="utf-8")
    second.write_text("gamma\n", encoding="utf-8")
    base = ("embed", str(first), str(second), "-m", tiny_model, "--cache-dir", str(cache_dir))
    out = tmp_path / "vectors.jsonl"
    written = cli(*base, "--out", str(out))  # the format follows the suffix
    assert written.returncode == 0, written.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["text"] for row in rows] == ["alpha", "beta", "gamma"]
    np.testing.assert_allclose(
        [row["embedding"] for row in rows],
        direct_model.encode(["alpha", "beta", "gamma"]),
        atol=1e-5,
    )
    odd = tmp_path / "vectors.bin"  # --format npy writes exactly the file it was given
    assert cli(*base, "--out", str(odd)).returncode == 0
    assert np.load(odd).shape == (3, 32) and not odd.with_name("vectors.bin.npy").exists()
    streamed = cli(*base, "--format", "jsonl")
    assert streamed.returncode == 0, streamed.stderr
    assert [json.loads(line) for line in streamed.stdout.splitlines()] == rows
    assert "3 from the cache" in streamed.stderr  # the summary keeps out of the data


def test_info_says_where_the_cache_is_and_what_each_shard_holds(
    tiny_model: str, cache_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "texts.txt"
    source.write_text("one\ntwo\n", encoding="utf-8")
    assert (
        cli("embed", str(source), "-m", tiny_model, "--cache-dir", str(cache_dir)).returncode == 0
    )
    result = cli("info", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert f"cache: {cache_dir} (SQLite files)" in result.stdout
    assert "texts: 2 in hashstring.db" in result.stdout
    assert f"model {tiny_model}, 32-d float32, 2 vectors, version sha256:" in result.stdout
    assert f"by embeddingcache {__version__}" in result.stdout
    assert cli("info", "--help").returncode == 0


def test_api_key_env_names_a_variable_and_an_error_never_repeats_a_key_given_instead(
    tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    """--api-key-env takes a variable's name; a key pasted there is refused without an echo,
    and an unset or empty variable is named, by `embed` and by `serve` alike."""
    source = tmp_path / "texts.txt"
    source.write_text("hello\n", encoding="utf-8")
    where = ["--cache-dir", str(tmp_path / "cache")]
    model = ["-m", "openai:text-embedding-3-small"]
    monkeypatch.delenv("EC_TEST_UNSET_KEY", raising=False)
    monkeypatch.setenv("EC_TEST_EMPTY_KEY", " ")
    for command in (["embed", str(source)], ["serve", "--port", "0"]):
        assert main([*command, *model, *where, "--api-key-env", "sk-proj-pasted-key-1"]) == 1
        err = capsys.readouterr().err
        assert "not a key" in err and "pasted-key" not in err and err.count("\n") == 1
        for name in ("EC_TEST_UNSET_KEY", "EC_TEST_EMPTY_KEY"):
            assert main([*command, *model, *where, "--api-key-env", name]) == 1
            assert f"the environment variable {name} is not set or empty" in capsys.readouterr().err


def test_the_npy_output_is_byte_for_byte_what_numpy_save_writes(
    tiny_model: str, cache_dir: Path, tmp_path: Path
) -> None:
    """The .npy written through the file, chunk by chunk, is numpy.save's file of the same
    matrix (header and rows), across several chunks."""
    from embeddingcache import EmbeddingCache
    from embeddingcache.cli import CHUNK

    lines = [f"line {i} of a file" for i in range(CHUNK * 2 + 7)]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "vectors.npy"
    done = cli(
        "embed", str(source), "-m", tiny_model, "--cache-dir", str(cache_dir), "-o", str(out)
    )
    assert done.returncode == 0, done.stderr
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        expected = tmp_path / "expected.npy"
        np.save(expected, cache.get_embeddings(lines))
    assert out.read_bytes() == expected.read_bytes()


def test_an_npy_file_closed_before_its_last_rows_holds_zeros_for_them(tmp_path: Path) -> None:
    """An interrupted job leaves a loadable .npy of its full shape, the rows not written
    zero (as the memory-mapped file did)."""
    from embeddingcache.npy import NpyWriter

    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    writer = NpyWriter(tmp_path / "part.npy", 5)
    writer.write(rows)
    writer.close()
    loaded = np.load(tmp_path / "part.npy")
    assert loaded.shape == (5, 4)
    np.testing.assert_array_equal(loaded[:3], rows)
    assert not loaded[3:].any()
    NpyWriter(tmp_path / "none.npy", 5).close()
    assert not (tmp_path / "none.npy").exists()  # no rows came: no file, as before


PEAK_RSS = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(child.pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, child.stderr.read().decode()[-2000:]
print(usage.ru_maxrss)
"""


def test_the_npy_output_does_not_grow_the_processs_memory_with_its_line_count(
    static_model: str, tmp_path: Path
) -> None:
    """Ten times the lines (45 MB more output) raise the peak RSS of `embeddingcache embed`
    by less than half of it: the rows go through the file, not a memory map that keeps
    them resident."""
    peaks = {}
    for lines in (5_000, 50_000):
        source = tmp_path / f"{lines}.txt"
        source.write_text("".join(f"text {i} of {lines}\n" for i in range(lines)), "utf-8")
        out = tmp_path / f"{lines}.npy"
        command = [sys.executable, "-m", "embeddingcache.cli", "embed", str(source)]
        command += ["-m", static_model, "--cache-dir", str(tmp_path / f"cache-{lines}")]
        command += ["-o", str(out), "--device", "cpu"]
        done = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, *command],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[lines] = int(done.stdout) / 1024  # MB
        assert np.load(out, mmap_mode="r").shape == (lines, 256)
    output_growth = 45_000 * 256 * 4 / 2**20
    assert peaks[50_000] - peaks[5_000] < output_growth / 2, peaks
