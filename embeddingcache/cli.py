"""The command line: a thin shell over the library. Library errors become one line on stderr
and a non-zero exit here, and only here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .cache import EmbeddingCache
from .config import ENV_TOKEN
from .errors import EmbeddingCacheError
from .protocol import Limits

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embeddingcache",
        description="Compute each text embedding once; read it from the cache after that.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    storage = argparse.ArgumentParser(add_help=False)
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

    embed = commands.add_parser(
        "embed",
        parents=[storage],
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
        description="List the cache's model shards: entries, dimension and bytes on disk.",
    )
    stats.set_defaults(run=_stats)

    serve = commands.add_parser(
        "serve",
        parents=[storage],
        help="run the HTTP backend that clients share",
        description="Serve POST /embed (msgpack or JSON), GET /healthz, /models and /stats "
        "over this cache, computing misses with the local model. See docs/protocol.md.",
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
    serve.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    serve.add_argument("--device", help="cpu, cuda, mps... (default: the best available)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(run=_serve)

    info = commands.add_parser(
        "info",
        parents=[storage],
        help="where the cache lives and what its shards hold",
        description="Show where the cache is (directory or database), its text table, and each "
        "model shard: the place that holds it, its model, dimension, and who created it.",
    )
    info.set_defaults(run=_info)

    migrate = commands.add_parser(
        "migrate",
        parents=[storage],
        help="bring the cache's tables to this version's schema",
        description="Apply the schema migrations to the text table and every model shard. "
        "Opening a cache does this too; this command does it ahead of time.",
    )
    migrate.set_defaults(run=_migrate)
    return parser


def _read_lines(sources: Sequence[str]) -> list[str]:
    lines: list[str] = []
    for source in sources:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        found = text.splitlines()
        for number, line in enumerate(found, start=1):
            if not line.strip():
                raise EmbeddingCacheError(f"{source}: line {number} is empty; one text per line")
        lines += found
    return lines


def _output_format(args: argparse.Namespace) -> str:
    if args.format is not None:
        return str(args.format)
    if args.out is not None and args.out.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    return "npy"


def _embed(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    texts = _read_lines(args.files)
    if not texts:
        raise EmbeddingCacheError(f"{' '.join(args.files)}: no text to embed")
    kind = _output_format(args)
    to_stdout = kind == "jsonl" and args.out is None
    with EmbeddingCache(
        args.model,
        cache_dir=args.cache_dir,
        db_url=args.db_url,
        remote_url=args.remote_url,
        timeout=args.timeout,
        batch_size=args.batch_size,
        device=args.device,
    ) as cache:
        parts = []
        with tqdm(
            total=len(texts),
            unit="text",
            file=sys.stderr,
            disable=len(texts) < PROGRESS_MIN,
        ) as bar:
            for start in range(0, len(texts), CHUNK):
                chunk = texts[start : start + CHUNK]
                parts.append(
                    cache.get_embeddings(chunk, normalize=args.normalize, truncate=args.truncate)
                )
                bar.update(len(chunk))
        stats = cache.stats
        model = cache.model
    vectors = np.concatenate(parts)
    if kind == "jsonl" and (to_stdout or args.out is not None):
        _write_jsonl(texts, vectors, args.out)
    elif args.out is not None:
        with open(args.out, "wb") as file:  # np.save(path) would add ".npy" to other names
            np.save(file, vectors)
    distinct = stats["hits"] + stats["misses"]
    print(
        f"{len(texts)} texts ({distinct} distinct) with {model}: "
        f"{stats['hits']} from the cache, {stats['remote_hits']} from the backend, "
        f"{stats['computed']} computed"
        + (f"; wrote {vectors.shape[0]}x{vectors.shape[1]} to {args.out}" if args.out else ""),
        # Standard output carries the vectors themselves when no file does.
        file=sys.stderr if to_stdout else sys.stdout,
    )
    return 0


def _write_jsonl(texts: list[str], vectors: np.ndarray, out: Path | None) -> None:
    stream = open(out, "w", encoding="utf-8") if out is not None else sys.stdout  # noqa: SIM115
    try:
        for text, vector in zip(texts, vectors.tolist(), strict=True):
            stream.write(json.dumps({"text": text, "embedding": vector}, ensure_ascii=False))
            stream.write("\n")
    finally:
        if out is not None:
            stream.close()


def _stats(args: argparse.Namespace) -> int:
    with EmbeddingCache(cache_dir=args.cache_dir, db_url=args.db_url) as cache:
        contents = cache.contents()
        print(f"cache: {contents.location}")
        print(f"texts: {contents.texts}")
        summaries = contents.shards
        if not summaries:
            print("no model shards yet")
        for s in summaries:
            print(
                f"{s.model or '?'}: {s.entries} vectors, {s.dimension or '?'}-d, "
                f"{s.bytes_on_disk / 1e6:.1f} MB ({s.place})"
            )
    return 0


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
            f"{s.place}: model {s.model or '?'}, {s.dimension or '?'}-d float32, "
            f"{s.entries} vectors, created {created} by embeddingcache "
            f"{s.library_version or '?'}"
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from .server import Backend, bind, create_app, serve
    except ImportError as exc:
        raise EmbeddingCacheError(
            f"the server needs FastAPI and uvicorn ({exc}): pip install 'embeddingcache[server]'"
        ) from exc
    for name in ("max_texts", "max_text_chars", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise EmbeddingCacheError(f"--{name.replace('_', '-')} must be at least 1")
    limits = Limits(
        max_texts=args.max_texts,
        max_text_chars=args.max_text_chars,
        max_body_bytes=args.max_body_bytes,
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
    )
    try:
        backend = Backend(
            cache, models, token=args.token, allow_push=args.allow_push, limits=limits
        )
        sock = bind(args.host, args.port)
    except BaseException:
        cache.close()
        raise
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    served = ", ".join(f"{name} ({s.dimension}-d)" for name, s in backend.models.items())
    print(f"embeddingcache: serving {served} at {url}", file=sys.stderr, flush=True)
    if args.token is None and host not in ("127.0.0.1", "::1", "localhost"):
        print(
            "embeddingcache: warning: listening beyond this machine without --token",
            file=sys.stderr,
            flush=True,
        )
    serve(create_app(backend), sock, access_log=args.access_log)
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


if __name__ == "__main__":
    raise SystemExit(main())
