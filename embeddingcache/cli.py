"""The command line: a thin shell over the library. Library errors become one line on stderr
and a non-zero exit here, and only here."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, NoReturn

import numpy as np

from . import __version__
from .cache import EmbeddingCache
from .config import ENV_PRICE_PER_MILLION, ENV_TOKEN, resolve_price_per_million
from .credentials import clean
from .errors import EmbeddingCacheError, EmbeddingCacheWarning
from .npy import NpyWriter
from .progress import Progress
from .protocol import Connections, Limits
from .storage import ShardSummary

__all__ = ["main"]

# Texts per library call while embedding a file: each call's results are stored before the
# next, and the progress bar moves once per call.
CHUNK = 512
PROGRESS_MIN = 2 * CHUNK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (EmbeddingCacheError, OSError) as exc:
        print(f"embeddingcache: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("embeddingcache: interrupted", file=sys.stderr)
        return 130


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake on one line like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="embeddingcache",
        description="Compute each text embedding once; read it from the cache after that.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    storage = _Parser(add_help=False)
    where = storage.add_mutually_exclusive_group()
    where.add_argument(
        "--cache-dir",
        help="cache directory (default: $EMBEDDING_CACHE_DIR or ~/.cache/embedding-cache)",
    )
    where.add_argument(
        "--db-url",
        help="a database URL to use instead, e.g. postgresql://user@host/db "
        "(default: $EMBEDDING_CACHE_DB_URL)",
    )

    api = _Parser(add_help=False)
    api.add_argument(
        "--base-url",
        metavar="URL",
        help="the OpenAI-compatible API that computes openai: models, e.g. "
        "http://127.0.0.1:11434/v1 (default: $OPENAI_BASE_URL, else OpenAI's)",
    )
    api.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="the NAME of the environment variable that holds the API key of openai: models "
        "(default: OPENAI_API_KEY); never the key itself",
    )

    embed = commands.add_parser(
        "embed",
        parents=[storage, api],
        help="embed text files, one text per line",
        description="Embed the lines of each FILE (or of standard input, -), one text per "
        "line; print how many came from the cache, the backend, or were computed.",
    )
    embed.add_argument(
        "files",
        metavar="FILE",
        nargs="+",
        help="UTF-8 text files, one text per line, read in order; - for standard input",
    )
    embed.add_argument(
        "--model", "-m", help="model name (default: $EMBEDDING_CACHE_MODEL or nomic-embed-text-v2)"
    )
    embed.add_argument(
        "--out",
        "-o",
        type=Path,
        help="write the vectors here: a .npy matrix in line order, or JSON lines "
        "(without --out, JSON lines go to standard output)",
    )
    embed.add_argument(
        "--format",
        choices=["npy", "jsonl"],
        help='npy, or jsonl: one {"text": ..., "embedding": [...]} per line '
        "(default: from the --out suffix, else npy)",
    )
    embed.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    embed.add_argument(
        "--normalize",
        default="strip",
        choices=["strip", "lower", "none"],
        help="text normalization policy (default: strip)",
    )
    embed.add_argument(
        "--truncate", action="store_true", help="cut texts longer than the model accepts"
    )
    embed.add_argument("--device", help="cpu, cuda, mps... (default: the best available)")
    embed.add_argument(
        "--remote-url",
        help="an `embeddingcache serve` backend to ask for what the cache lacks "
        "(default: $EMBEDDING_CACHE_URL)",
    )
    embed.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the backend (5)"
    )
    embed.set_defaults(run=_embed)

    stats = commands.add_parser(
        "stats",
        parents=[storage],
        help="what the cache holds",
        description="List the cache's model shards: entries, dimension, bytes on disk, and "
        "the hits and misses counted across every run since the shard was created (each "
        "process adds its counts about once a minute and when it closes); for a model that "
        "bills by the token (an API's), what its vectors cost and the tokens its hits saved.",
    )
    stats.add_argument(
        "--price-per-million",
        type=float,
        metavar="USD",
        help="what a million tokens cost: the tokens saved are shown in USD too "
        f"(default: ${ENV_PRICE_PER_MILLION}; none)",
    )
    stats.set_defaults(run=_stats)

    serve = commands.add_parser(
        "serve",
        parents=[storage, api],
        help="run the HTTP backend that clients share",
        description="Serve POST /embed (msgpack or JSON), POST /v1/embeddings, GET /healthz, "
        "/models and /stats over this cache, computing misses with the local model, or, for "
        "an openai: model, through its API with the key in this server's environment (a "
        "caching proxy: clients need no key of the provider's). See docs/protocol.md.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument(
        "--port", type=int, default=8000, help="port to listen on; 0 picks a free one (8000)"
    )
    serve.add_argument(
        "--model",
        "-m",
        action="append",
        metavar="MODEL",
        help="a model to serve; repeat for several, the first is the default "
        "(default: $EMBEDDING_CACHE_MODEL or nomic-embed-text-v2)",
    )
    serve.add_argument(
        "--token",
        default=os.environ.get(ENV_TOKEN) or None,
        help="require 'Authorization: Bearer TOKEN' (default: $EMBEDDING_CACHE_TOKEN; none)",
    )
    serve.add_argument(
        "--allow-push",
        action="store_true",
        help="accept vectors that clients computed (POST /push); trust your clients first",
    )
    defaults = Limits()
    serve.add_argument(
        "--max-texts", type=int, default=defaults.max_texts, help="texts per request (%(default)s)"
    )
    serve.add_argument(
        "--max-text-chars",
        type=int,
        default=defaults.max_text_chars,
        help="characters per text (%(default)s)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.max_body_bytes,
        help="bytes per request body (%(default)s)",
    )
    serve.add_argument(
        "--truncate",
        action="store_true",
        help="on /v1/embeddings, embed the first tokens of an input longer than the model "
        'takes, unless the request says "truncate": false (default: refuse it with a 400)',
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="a browser origin that may call the server (https://app.example.com, or * for "
        "any); repeat for several (default: none, no CORS)",
    )
    connections = Connections()
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=connections.header_timeout_s,
        metavar="S",
        help="close a connection that has not sent a request's headers in S seconds (%(default)s)",
    )
    serve.add_argument(
        "--body-timeout",
        type=float,
        default=defaults.body_timeout_s,
        metavar="S",
        help="answer 408 to a body that has not arrived in S seconds (%(default)s)",
    )
    serve.add_argument(
        "--keep-alive",
        type=int,
        default=connections.keep_alive_s,
        metavar="S",
        help="close a connection idle for S seconds after an answer (%(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=connections.max_connections,
        metavar="N",
        help="connections open at once; beyond, a new one gets 503 (%(default)s)",
    )
    serve.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    serve.add_argument("--device", help="cpu, cuda, mps... (default: the best available)")
    serve.add_argument(
        "--access-log", action="store_true", help="log every request, with its id and time"
    )
    serve.set_defaults(run=_serve)

    info = commands.add_parser(
        "info",
        parents=[storage],
        help="where the cache lives and what its shards hold",
        description="Show where the cache is (directory or database), its text table, and each "
        "model shard: the place that holds it, its model, dimension, and who created it.",
    )
    info.set_defaults(run=_info)

    prune = commands.add_parser(
        "prune",
        parents=[storage],
        help="remove entries by size budget, age or model",
        description="Remove cached vectors: with --model, all of that model's (or, with another "
        "option, only that model's); with --older-than, those unused for that long; with "
        "--max-size, the least recently used until the cache fits. Texts no model refers to "
        "any longer go too, and SQLite files are compacted. Last use is known to the day.",
    )
    prune.add_argument(
        "--max-size",
        type=_size,
        metavar="SIZE",
        help="bytes on disk to keep the cache within: 500MB, 2GiB... (SQLite caches)",
    )
    prune.add_argument(
        "--older-than",
        type=_age,
        metavar="AGE",
        help="remove entries unused for this long: 30d, 12h, 2w, 90m, 45s",
    )
    prune.add_argument("--model", "-m", help="remove this model's entries (only)")
    prune.add_argument(
        "--stale-versions",
        action="store_true",
        help="remove the shards of model versions whose weights no longer exist "
        "(a folder fine-tuned since, a Hub snapshot deleted)",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="say what would be removed; remove nothing"
    )
    prune.set_defaults(run=_prune)

    export = commands.add_parser(
        "export",
        parents=[storage],
        help="write one model's vectors and texts to a portable file",
        description="Write every vector of one model, with the text it was computed from, to "
        "FILE: JSON lines, gzip-compressed when FILE ends in .gz. `embeddingcache import` reads "
        "it into another cache. See docs/cli.md for the format.",
    )
    export.add_argument("file", metavar="FILE", type=Path, help="the file to write")
    export.add_argument(
        "--model",
        "-m",
        help="the model whose shard to export "
        "(default: $EMBEDDING_CACHE_MODEL or nomic-embed-text-v2)",
    )
    export.set_defaults(run=_export)

    import_ = commands.add_parser(
        "import",
        parents=[storage],
        help="add the vectors of an exported file that the cache lacks",
        description="Read a file written by `embeddingcache export` and store the vectors the "
        "cache lacks, in the shard of the model the file names. The whole file is checked "
        "before anything is written; vectors already stored are kept as they are.",
    )
    import_.add_argument("file", metavar="FILE", type=Path, help="the file to read")
    import_.set_defaults(run=_import)

    migrate = commands.add_parser(
        "migrate",
        parents=[storage],
        help="bring the cache's tables to this version's schema",
        description="Apply the schema migrations to the text table and every model shard. "
        "Opening a cache does this too; this command does it ahead of time.",
    )
    migrate.set_defaults(run=_migrate)

    quiet = _Parser(add_help=False)
    quiet.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    backup = commands.add_parser(
        "backup",
        parents=[storage, quiet],
        help="back up a SQLite cache, in use or not, to a folder or an S3 bucket",
        description="Copy every file of the cache as of one moment while other processes "
        "read and write it (writers do not wait), check each copy, and write them with a "
        "manifest (sizes, SHA-256, schema revisions, models, counts) to DEST: a folder, or "
        "s3://bucket/prefix on any S3-compatible store (endpoint and credentials as boto3 "
        "takes them: AWS_ENDPOINT_URL, AWS_PROFILE...). Files already at DEST unchanged are "
        "not sent again. A Postgres cache is backed up with pg_dump (docs/recipes.md).",
    )
    backup.add_argument("dest", metavar="DEST", help="a folder, or s3://bucket/prefix")
    backup.set_defaults(run=_backup)

    restore = commands.add_parser(
        "restore",
        parents=[storage, quiet],
        help="restore a backup into a cache folder",
        description="Fetch the backup at SRC (a folder or s3://bucket/prefix written by "
        "`embeddingcache backup`), check every file against its manifest and with SQLite's "
        "integrity check before any is put in place, then upgrade older schemas. A cache "
        "folder that holds files is refused unless --force.",
    )
    restore.add_argument("src", metavar="SRC", help="a folder, or s3://bucket/prefix")
    restore.add_argument(
        "--force",
        action="store_true",
        help="replace the files the cache folder holds (stop the processes that use it first)",
    )
    restore.set_defaults(run=_restore)
    return parser


@contextlib.contextmanager
def _line_sources(sources: Sequence[str]) -> Iterator[list[tuple[str, Path]]]:
    """The files to read, each as ``(name, path)``; standard input is copied to a temporary
    file first (on disk, not in memory), so that every source can be read twice: once to
    check and count its lines, once to embed them."""
    with tempfile.TemporaryDirectory(prefix="embeddingcache-") as folder:
        found: list[tuple[str, Path]] = []
        for source in sources:
            if source == "-":
                spool = Path(folder) / f"stdin-{len(found)}"
                with open(spool, "wb") as copy:
                    shutil.copyfileobj(sys.stdin.buffer, copy)
                found.append(("-", spool))
            else:
                found.append((source, Path(source)))
        yield found


def _lines(sources: Sequence[tuple[str, Path]]) -> Iterator[str]:
    """The lines of the sources in order, one at a time, each checked non-empty.

    Raises:
        EmbeddingCacheError: an empty line (named by source and number).
    """
    for name, path in sources:
        with open(path, encoding="utf-8", newline=None) as file:
            for number, line in enumerate(file, start=1):
                text = line.rstrip("\r\n")
                if not text.strip():
                    raise EmbeddingCacheError(f"{name}: line {number} is empty; one text per line")
                yield text


def _output_format(args: argparse.Namespace) -> str:
    if args.format is not None:
        return str(args.format)
    if args.out is not None and args.out.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    return "npy"


def _embed(args: argparse.Namespace) -> int:
    with _line_sources(args.files) as sources:
        total = sum(1 for _ in _lines(sources))  # checks every line before any work
        if not total:
            raise EmbeddingCacheError(f"{' '.join(args.files)}: no text to embed")
        with _warnings_once():
            return _embed_lines(args, _lines(sources), total)


@contextlib.contextmanager
def _warnings_once() -> Iterator[None]:
    """Show the library's warnings at the end, each once, on a line of its own like every
    other message: a cache that cannot be written (a full disk) warns at every chunk, and
    the progress bar shares standard error. Other warnings are shown as Python would."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EmbeddingCacheWarning)
        try:
            yield
        finally:
            shown: set[str] = set()
            for warning in caught:
                message = str(warning.message)
                if not issubclass(warning.category, EmbeddingCacheWarning):
                    warnings.showwarning(
                        warning.message, warning.category, warning.filename, warning.lineno
                    )
                elif message not in shown:
                    shown.add(message)
                    print(f"embeddingcache: warning: {message}", file=sys.stderr)


def _embed_lines(args: argparse.Namespace, texts: Iterator[str], total: int) -> int:
    """Embed ``total`` lines as they are read, writing each chunk's output as it comes: memory
    is bounded by a chunk, not by the file."""
    kind = _output_format(args)
    to_stdout = kind == "jsonl" and args.out is None
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(
            EmbeddingCache(
                args.model,
                cache_dir=args.cache_dir,
                db_url=args.db_url,
                remote_url=args.remote_url,
                timeout=args.timeout,
                batch_size=args.batch_size,
                device=args.device,
                base_url=args.base_url,
                api_key=_api_key(args),
            )
        )
        # The library's bar (texts/s, hits, computed, ETA), moved once per chunk.
        bar = stack.enter_context(Progress(total, enabled=total >= PROGRESS_MIN))
        jsonl = None
        if kind == "jsonl":
            jsonl = (
                stack.enter_context(open(args.out, "w", encoding="utf-8"))
                if args.out is not None
                else sys.stdout
            )
        matrix = None
        if kind == "npy" and args.out is not None:
            # Written through the file, not mapped: RSS stays one chunk (`npy`).
            matrix = stack.enter_context(contextlib.closing(NpyWriter(args.out, total)))
        done = 0
        try:
            chunks = _chunks(texts, CHUNK)
            for chunk in chunks:
                vectors = cache.get_embeddings(
                    chunk, normalize=args.normalize, truncate=args.truncate
                )
                if jsonl is not None:
                    _write_jsonl(chunk, vectors, jsonl)
                elif matrix is not None:
                    matrix.write(vectors)
                done += len(chunk)
                stats = cache.stats
                hits = stats["hits"] + stats["remote_hits"]
                bar.add(len(chunk), hits=hits - bar.hits, computed=stats["computed"] - bar.computed)
        except KeyboardInterrupt:
            bar.close()
            stats = cache.stats
            stored = stats["hits"] + stats["remote_hits"] + stats["computed"]
            print(
                f"embeddingcache: interrupted after {stored} texts stored; "
                "run the same command again to continue from there",
                file=sys.stderr,
            )
            return 130
        if matrix is not None:
            matrix.close()
            shape = f"{matrix.shape[0]}x{matrix.shape[1]}"
        stats = cache.stats
        model = cache.model
    distinct = stats["hits"] + stats["misses"]
    wrote = ""
    if args.out is not None:
        wrote = f"; wrote {shape if kind == 'npy' else str(total) + ' lines'} to {args.out}"
    if stats["not_stored"]:  # a full disk, say: the warnings below say why
        wrote += f"; {stats['not_stored']} not stored in the cache"
    print(
        f"{total} texts ({distinct} distinct) with {model}: "
        f"{stats['hits']} from the cache, {stats['remote_hits']} from the backend, "
        f"{stats['computed']} computed" + wrote,
        # Standard output carries the vectors themselves when no file does.
        file=sys.stderr if to_stdout else sys.stdout,
    )
    return 0


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _api_key(args: argparse.Namespace) -> str | None:
    """The API key of ``openai:`` models, read from the variable ``--api-key-env`` names
    (``None`` without it: the library's default, $OPENAI_API_KEY, applies). A key is never
    taken from a command line, which ``ps`` and shell histories show; and no error repeats
    what was given for NAME: it may be a key pasted by mistake.

    Raises:
        EmbeddingCacheError: NAME is not a variable name, or the variable is unset or empty.
    """
    name = args.api_key_env
    if name is None:
        return None
    if not _ENV_NAME.fullmatch(name):
        raise EmbeddingCacheError(
            "--api-key-env takes the name of an environment variable (letters, digits and "
            "_, e.g. OPENAI_API_KEY), not a key: put the key in that variable"
        )
    key = clean(os.environ.get(name, ""), f"--api-key-env {name}: the variable {name}")
    if not key:
        raise EmbeddingCacheError(
            f"--api-key-env {name}: the environment variable {name} is not set or empty"
        )
    return key


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _write_jsonl(texts: list[str], vectors: np.ndarray, stream: IO[str]) -> None:
    for text, vector in zip(texts, vectors.tolist(), strict=True):
        stream.write(json.dumps({"text": text, "embedding": vector}, ensure_ascii=False))
        stream.write("\n")


def _stats(args: argparse.Namespace) -> int:
    price = resolve_price_per_million(args.price_per_million)
    with EmbeddingCache(cache_dir=args.cache_dir, db_url=args.db_url) as cache:
        contents = cache.contents()
        print(f"cache: {contents.location}")
        print(f"texts: {contents.texts}")
        summaries = contents.shards
        if not summaries:
            print("no model shards yet")
        for s in summaries:
            lookups = s.hits + s.misses
            use = (
                f"{s.hits} hits, {s.misses} misses ({s.hits / lookups:.0%} hits)"
                if lookups
                else "no lookups recorded"
            )
            print(
                f"{s.model or '(emptied)'}: {s.entries} vectors, {s.dimension or '?'}-d, "
                f"{_megabytes(s.bytes_on_disk)}, {use}, version {s.revision or '?'} ({s.place})"
            )
            print(f"  tokens: {_tokens(s, price)}")
    return 0


def _tokens(s: ShardSummary, price: float | None) -> str:
    """One shard's line of the savings report: what its vectors cost, what its hits saved."""
    if not s.tokens_counted and not s.tokens_saved:
        return "not counted (a local model, or vectors from before counts were kept)"
    kind = (
        "exact"
        if not s.tokens_estimated
        else "estimated"
        if s.tokens_estimated == s.tokens
        else f"{s.tokens_estimated} of them estimated"
    )
    uncounted = s.entries - s.tokens_counted
    spent = f"{s.tokens} for {s.tokens_counted} vectors ({kind})" + (
        f", {uncounted} vectors uncounted" if uncounted > 0 else ""
    )
    saved = f"{s.tokens_saved} saved by hits" + (
        f" ({_usd(s.tokens_saved * price / 1e6)} at ${price:g} per million)"
        if price is not None
        else ""
    )
    return f"{spent}; {saved}"


def _info(args: argparse.Namespace) -> int:
    with EmbeddingCache(cache_dir=args.cache_dir, db_url=args.db_url, remote_url=False) as cache:
        contents = cache.contents()
    files = cache.db_url is None
    print(f"cache: {contents.location} ({'SQLite files' if files else 'database'})")
    table = "hashstring.db" if files else "embeddingcache.hashstring"
    print(f"texts: {contents.texts} in {table}")
    if not contents.shards:
        print("no model shards yet")
    for s in contents.shards:
        created = time.strftime("%Y-%m-%d", time.gmtime(s.created_at)) if s.created_at else "?"
        print(
            f"{s.place}: model {s.model or '(emptied)'}, {s.dimension or '?'}-d float32, "
            f"{s.entries} vectors, version {s.revision or '(not recorded yet)'}, created "
            f"{created} by embeddingcache {s.library_version or '?'}"
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    with EmbeddingCache(
        args.model, cache_dir=args.cache_dir, db_url=args.db_url, remote_url=False
    ) as cache:
        report = cache.export_to(args.file)
    skipped = [
        f"{count} {why}"
        for count, why in (
            (report.skipped_no_text, "without a stored text"),
            (report.skipped_inexact, "whose text is not stored exactly (NUL on Postgres)"),
            (report.skipped_damaged, "damaged"),
        )
        if count
    ]
    print(
        f"exported {report.written} vectors of {report.model} ({report.dimension}-d) "
        f"to {args.file}" + (f"; skipped {', '.join(skipped)}" if skipped else "")
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    with EmbeddingCache(cache_dir=args.cache_dir, db_url=args.db_url, remote_url=False) as cache:
        report = cache.import_from(args.file)
    print(
        f"imported {report.read} vectors of {report.model} ({report.dimension}-d) "
        f"from {args.file}: {report.added} new, {report.already_present} already stored"
    )
    return 0


_SIZE_UNITS = {
    "": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
    "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
    "tib": 2**40,
}  # fmt: skip
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _size(value: str) -> int:
    """``500MB``, ``1.5G``, ``2GiB`` or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None or float(match.group(1)) * unit < 1:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a size; write a number and a unit: 500MB, 1.5GB, 2GiB"
        )
    return int(float(match.group(1)) * unit)


def _age(value: str) -> float:
    """``30d``, ``12h``, ``2w``, ``90m`` or ``45s``: lowercase units only, so that ``6M``
    (months?) is an error rather than six minutes."""
    match = re.fullmatch(r"\s*([0-9]{1,9}(?:\.[0-9]+)?)\s*([smhdw])\s*", value)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an age; write a number and a unit: 30d, 12h, 2w, 90m, 45s"
        )
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]


def _usd(amount: float) -> str:
    """Dollars and cents, or the digits that matter of less than a cent."""
    if amount >= 0.01 or amount == 0:
        return f"${amount:,.2f}"
    return "$" + f"{amount:.8f}".rstrip("0")


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _prune(args: argparse.Namespace) -> int:
    if (
        args.max_size is None
        and args.older_than is None
        and args.model is None
        and not args.stale_versions
    ):
        raise EmbeddingCacheError(
            "say what to prune: --max-size, --older-than, --model or --stale-versions"
        )
    with EmbeddingCache(cache_dir=args.cache_dir, db_url=args.db_url, remote_url=False) as cache:
        report = cache.prune(
            model=args.model,
            older_than=args.older_than,
            max_size=args.max_size,
            dry_run=args.dry_run,
            stale_versions=args.stale_versions,
        )
    per_model = ", ".join(f"{name}: {n}" for name, n in sorted(report.removed.items()))
    if report.dry_run:
        if not report.vectors_removed:
            print(f"nothing to remove; the cache takes {_megabytes(report.bytes_before)}")
        else:
            print(
                f"would remove {report.vectors_removed} vectors ({per_model}) and the texts "
                f"only they use; the cache would take about {_megabytes(report.bytes_after)} "
                f"(now {_megabytes(report.bytes_before)})"
            )
        return 0
    if not report.vectors_removed and not report.texts_removed:
        print(f"nothing to remove; the cache takes {_megabytes(report.bytes_after)}")
        return 0
    print(
        f"removed {report.vectors_removed} vectors"
        + (f" ({per_model})" if per_model else "")
        + f" and {report.texts_removed} texts; the cache takes "
        f"{_megabytes(report.bytes_after)} (was {_megabytes(report.bytes_before)})"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from .server import Backend, bind, create_app, serve
    except ImportError as exc:
        raise EmbeddingCacheError(
            f"the server needs FastAPI and uvicorn ({exc}): pip install 'embeddingcache[server]'"
        ) from exc
    for name in ("max_texts", "max_text_chars", "max_body_bytes", "keep_alive", "max_connections"):
        if getattr(args, name) < 1:
            raise EmbeddingCacheError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("header_timeout", "body_timeout"):
        if not getattr(args, name) > 0:
            raise EmbeddingCacheError(f"--{name.replace('_', '-')} must be more than 0")
    limits = Limits(
        max_texts=args.max_texts,
        max_text_chars=args.max_text_chars,
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout,
    )
    connections = Connections(
        header_timeout_s=args.header_timeout,
        keep_alive_s=args.keep_alive,
        max_connections=args.max_connections,
    )
    models = args.model or []
    cache = EmbeddingCache(
        models[0] if models else None,
        cache_dir=args.cache_dir,
        db_url=args.db_url,
        remote_url=False,  # a backend computes; it never asks another backend
        fallback_providers=("local",),
        batch_size=args.batch_size,
        device=args.device,
        base_url=args.base_url,
        api_key=_api_key(args),
    )
    try:
        backend = Backend(
            cache,
            models,
            token=args.token,
            allow_push=args.allow_push,
            limits=limits,
            truncate=args.truncate,
        )
        sock = bind(args.host, args.port)
    except BaseException:
        cache.close()
        raise
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    served = ", ".join(f"{name} ({s.dimension}-d)" for name, s in backend.models.items())
    print(f"embeddingcache: serving {served} at {url}", file=sys.stderr, flush=True)
    if backend.token is None and host not in ("127.0.0.1", "::1", "localhost"):
        print(
            "embeddingcache: warning: listening beyond this machine without --token",
            file=sys.stderr,
            flush=True,
        )
    app = create_app(backend, cors_origins=args.cors_origin or (), access_log=args.access_log)
    serve(app, sock, connections)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    with EmbeddingCache(cache_dir=args.cache_dir, db_url=args.db_url) as cache:
        places = cache.migrate()
        where = cache.contents().location
    if places:
        print(f"{where}: {', '.join(places)} at the current schema")
    else:
        print(f"{where}: nothing stored yet; a new cache is created at the current schema")
    return 0


def _backup(args: argparse.Namespace) -> int:
    with EmbeddingCache(cache_dir=args.cache_dir, db_url=args.db_url, remote_url=False) as cache:
        report = cache.backup(args.dest, show_progress=not args.quiet)
    size = sum(f.bytes for f in report.files)
    print(
        f"backed up {len(report.files)} files ({_megabytes(size)}) to {report.destination} "
        f"in {report.seconds:.1f} s: {report.sent} sent ({_megabytes(report.bytes_sent)}), "
        f"{len(report.files) - report.sent} unchanged"
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    with EmbeddingCache(cache_dir=args.cache_dir, db_url=args.db_url, remote_url=False) as cache:
        report = cache.restore(args.src, force=args.force, show_progress=not args.quiet)
    shards = [f for f in report.files if f.model is not None]
    texts = sum(f.entries for f in report.files if f.name == "hashstring.db")
    models = ", ".join(f"{f.model}: {f.entries} vectors" for f in shards)
    print(
        f"restored {len(report.files)} files from {report.source} (taken {report.created_at}) "
        f"into {report.cache_dir}: {texts} texts"
        + (f"; {models}" if models else "")
        + (f"; upgraded {', '.join(report.upgraded)}" if report.upgraded else "")
        + (f"; replaced {len(report.replaced)} files" if report.replaced else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
