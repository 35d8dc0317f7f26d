"""Moving one model shard to and from a portable file of texts and vectors.

The file is UTF-8 JSON Lines, gzip-compressed when its name ends in ``.gz``. The first line is
a header, every other line one entry::

    {"format": "embeddingcache-export", "version": 1, "model": "all-MiniLM-L6-v2",
     "dimension": 384, "dtype": "float32", "library_version": "0.1.0"}
    {"text": "The cat sits outside.", "vector": "<base64 of 4 * dimension bytes>"}

``text`` is the embedded string (the normalized text with the model's prompt in front) and
``vector`` the stored float32 little-endian bytes, so a round trip is bit-identical. An
import recomputes each key from its text and never reads one from the file: an entry cannot
file a vector under another text than its own. It checks the whole file before it writes
anything, and it never replaces a stored vector, except one of the wrong length (damaged).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import json
import logging
import os
import secrets
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._util import finite_rows, first_non_finite
from ._version import __version__
from .errors import DimensionMismatchError, InvalidInputError, ShardMismatchError
from .pipeline import store_new
from .storage import Store
from .storage.store import entries
from .storage.tables import WRITE_BATCH

__all__ = ["FORMAT", "VERSION", "ExportReport", "ImportReport", "export_shard", "import_file"]

logger = logging.getLogger("embeddingcache.transfer")

FORMAT = "embeddingcache-export"
VERSION = 1
DTYPE = "float32"


@dataclass(frozen=True)
class ExportReport:
    """What `export_shard` wrote, and what it left out and why."""

    model: str
    """The model whose shard was exported."""
    dimension: int
    """The length of its vectors."""
    written: int
    """The entries written to the file."""
    skipped_no_text: int
    """Vectors left out because their text row is missing."""
    skipped_inexact: int
    """Vectors left out because their text is not stored exactly (on Postgres, NUL as
    U+FFFD), so that its SHA-512 is not the key."""
    skipped_damaged: int = 0
    """Stored vectors left out because they have the wrong length or are not finite."""


@dataclass(frozen=True)
class ImportReport:
    """What `import_file` read, and what of it the cache lacked.

    ``read == added + already_present``: an entry whose text the cache held before, or an
    earlier line of the file held, counts as already present.
    """

    model: str
    dimension: int
    read: int
    added: int
    already_present: int


# -- export --------------------------------------------------------------------------------


def export_shard(store: Store, model: str, path: str | os.PathLike[str]) -> ExportReport:
    """Write every vector of ``model`` with its text to ``path`` (gzip when it ends in ``.gz``).

    ``model`` is the name the shard records (a catalog name, or a model folder's absolute
    path). The file appears under its name only when complete: it is written beside it and
    renamed at the end. Vectors whose text is missing or stored inexactly, and damaged ones,
    are left out and counted.

    Raises:
        InvalidInputError: nothing is stored for ``model``.
        ShardMismatchError: the shard of ``model``'s slug belongs to another model.
        StorageError: the cache cannot be read.
        OSError: the file cannot be written.
    """
    target = Path(path)
    info = store.info(model)
    if info is None:
        raise InvalidInputError(_nothing_stored(store, model))
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": info.model,
        "dimension": info.dimension,
        "dtype": DTYPE,
        "library_version": __version__,
    }
    width = 4 * info.dimension
    written = no_text = inexact = damaged = 0
    # A name no other export picks, in the target's folder so that the rename stays on one
    # file system and is atomic.
    partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")
    try:
        with _writer(target, partial) as out:
            out.write(_json_line(header))
            for rows, texts in entries(store, model):
                sound = _sound(rows, width)
                lines = []
                for (key, vector), ok in zip(rows, sound, strict=True):
                    text = texts.get(key)
                    if not ok:
                        damaged += 1
                    elif text is None:
                        no_text += 1
                    elif not _exact(text, key):
                        inexact += 1
                    else:
                        entry = {"text": text, "vector": base64.b64encode(vector).decode("ascii")}
                        lines.append(_json_line(entry))
                written += len(lines)
                out.write(b"".join(lines))  # one write per chunk: gzip compresses it in one go
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if no_text or inexact or damaged:
        logger.warning(
            "export of %r left out %d vector(s) without text, %d with an inexact text and "
            "%d damaged",
            model,
            no_text,
            inexact,
            damaged,
        )
    return ExportReport(info.model, info.dimension, written, no_text, inexact, damaged)


def _nothing_stored(store: Store, model: str) -> str:
    models = sorted(s.model for s in store.summaries() if s.model)
    held = f"it holds {', '.join(map(repr, models))}" if models else "it holds no model yet"
    return f"nothing stored for model {model!r} in {store.layout.describe()}; {held}"


def _sound(rows: list[tuple[bytes, bytes]], width: int) -> list[bool]:
    """Per row, whether its vector has the shard's length and only finite values: a file
    holding any other would be refused whole by an import."""
    ok = [len(vector) == width for _, vector in rows]
    good = b"".join(vector for (_, vector), fits in zip(rows, ok, strict=True) if fits)
    finite = iter(finite_rows(np.frombuffer(good, "<f4").reshape(-1, width // 4)))
    return [fits and bool(next(finite)) for fits in ok]


def _exact(text: str, key: bytes) -> bool:
    """Whether ``text`` is exactly the string that ``key`` is the digest of."""
    try:
        return hashlib.sha512(text.encode("utf-8")).digest() == key
    except UnicodeEncodeError:
        return False


def _json_line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _compressed(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


@contextmanager
def _writer(target: Path, partial: Path) -> Iterator[io.BufferedIOBase]:
    """The partial file, gzip-compressed when the target's name says so, on disk at exit."""
    with open(partial, "xb") as raw:
        if _compressed(target):
            # The gzip header names the target, not the partial file.
            with gzip.GzipFile(filename=target.name, mode="wb", fileobj=raw) as packed:
                yield packed
        else:
            yield raw
        raw.flush()
        # Durable before the rename: a crash must not leave an empty file under the name.
        os.fsync(raw.fileno())


# -- import --------------------------------------------------------------------------------


def import_file(store: Store, path: str | os.PathLike[str]) -> ImportReport:
    """Add the vectors of an export file that the cache lacks to the shard of its model.

    The whole file is checked first; nothing is written unless every line is sound. Keys are
    recomputed from the texts. A stored vector is never replaced, except a damaged one (of
    the wrong length).

    Raises:
        InvalidInputError: the file is not an export (a bad header, gzip or JSON; a line
            whose text or vector is not valid); the message names the file and the line.
        ShardMismatchError: the shard of the file's model belongs to another model.
        DimensionMismatchError: the shard holds vectors of another dimension than the file.
        StorageError: the cache cannot be read or written.
        OSError: the file cannot be read.
    """
    source = Path(path)
    model, dimension = _read_header(source)
    try:
        info = store.info(model)
    except ShardMismatchError as exc:
        raise ShardMismatchError(f"cannot import {source}: {exc}") from exc
    if info is not None and info.dimension != dimension:
        raise DimensionMismatchError(
            f"cannot import {source}: it holds {dimension}-d vectors of model {model!r}, "
            f"but the cache's shard of that model holds {info.dimension}-d ones"
        )
    read = sum(len(texts) for texts, _ in _batches(source, model, dimension))
    added = 0
    for texts, blobs in _batches(source, model, dimension):
        added += _add(store, model, dimension, texts, blobs)
    return ImportReport(model, dimension, read, added, read - added)


def _add(store: Store, model: str, dimension: int, texts: list[str], blobs: list[bytes]) -> int:
    """Store what the shard lacks of one batch (a text repeated in the file: its first line
    wins); how many vectors that was."""
    vectors = np.frombuffer(b"".join(blobs), "<f4").reshape(len(blobs), dimension)
    return store_new(store, model, texts, vectors)


def _read_header(source: Path) -> tuple[str, int]:
    with _reader(source) as lines:
        return _header(next(lines, None), source)


def _batches(source: Path, model: str, dimension: int) -> Iterator[tuple[list[str], list[bytes]]]:
    """The file's entries, checked, in batches of ``(texts, vectors' bytes)``."""
    width = 4 * dimension
    with _reader(source) as lines:
        # The second pass reads the file again: the header must still be the one checked.
        if _header(next(lines, None), source) != (model, dimension):
            raise InvalidInputError(f"{source} changed while it was being imported")
        numbers: list[int] = []
        texts: list[str] = []
        blobs: list[bytes] = []
        for number, line in enumerate(lines, start=2):
            text, blob = _entry(line, f"{source}: line {number}", width)
            numbers.append(number)
            texts.append(text)
            blobs.append(blob)
            if len(texts) == WRITE_BATCH:  # one write transaction of the store
                _check_finite(numbers, blobs, dimension, source)
                yield texts, blobs
                numbers, texts, blobs = [], [], []
        if texts:
            _check_finite(numbers, blobs, dimension, source)
            yield texts, blobs


@contextmanager
def _reader(source: Path) -> Iterator[Iterator[bytes]]:
    """The file's lines as bytes (decompressed when its name ends in ``.gz``).

    A damaged gzip stream surfaces while the lines are read; it becomes an
    `InvalidInputError` naming the file.
    """
    with open(source, "rb") as raw:
        stream: io.BufferedIOBase = (
            gzip.GzipFile(fileobj=raw, mode="rb") if _compressed(source) else raw
        )
        try:
            yield iter(stream)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise InvalidInputError(f"{source} is not a readable gzip file: {exc}") from None
        finally:
            stream.close()


def _load(line: bytes, where: str, *, encoding: str = "utf-8") -> dict[str, Any]:
    if not line.strip():
        raise InvalidInputError(f"{where} is empty; every line holds one JSON object")
    try:
        value = json.loads(line.decode(encoding))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both
        raise InvalidInputError(f"{where} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where} is not a JSON object")
    return value


def _header(line: bytes | None, source: Path) -> tuple[str, int]:
    if line is None:
        raise InvalidInputError(f"{source} is empty; expected an embeddingcache export")
    where = f"{source}: line 1 (the header)"
    # A byte order mark, as some editors write, is not part of the JSON.
    header = _load(line, where, encoding="utf-8-sig")
    if header.get("format") != FORMAT:
        raise InvalidInputError(
            f"{where} has format {header.get('format')!r}, not {FORMAT!r}: "
            "not an embeddingcache export"
        )
    version = header.get("version")
    if version != VERSION or isinstance(version, bool):
        raise InvalidInputError(
            f"{where} has version {version!r}; this embeddingcache reads version {VERSION}"
        )
    model = header.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidInputError(f"{where}: 'model' must be a non-empty string, not {model!r}")
    dimension = header.get("dimension")
    if not isinstance(dimension, int) or isinstance(dimension, bool) or dimension < 1:
        raise InvalidInputError(
            f"{where}: 'dimension' must be a positive integer, not {dimension!r}"
        )
    if header.get("dtype") != DTYPE:
        raise InvalidInputError(f"{where}: 'dtype' must be {DTYPE!r}, not {header.get('dtype')!r}")
    return model, dimension


def _entry(line: bytes, where: str, width: int) -> tuple[str, bytes]:
    entry = _load(line, where)
    text = entry.get("text")
    if not isinstance(text, str) or not text:
        raise InvalidInputError(f"{where}: 'text' must be a non-empty string, not {text!r:.80}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON can spell a lone surrogate (\ud800), which has no UTF-8 and so no key.
        raise InvalidInputError(
            f"{where}: 'text' is not valid Unicode (character {exc.start} is a lone surrogate)"
        ) from None
    vector = entry.get("vector")
    if not isinstance(vector, str):
        raise InvalidInputError(f"{where}: 'vector' must be a base64 string")
    try:
        blob = base64.b64decode(vector, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(f"{where}: 'vector' is not valid base64: {exc}") from None
    if len(blob) != width:
        raise InvalidInputError(
            f"{where}: 'vector' holds {len(blob)} bytes, not {width} ({width // 4} float32 values)"
        )
    return text, blob


def _check_finite(numbers: list[int], blobs: list[bytes], dimension: int, source: Path) -> None:
    """One numpy pass per batch rather than one per line; the first bad line is named."""
    matrix = np.frombuffer(b"".join(blobs), "<f4").reshape(len(blobs), dimension)
    bad = first_non_finite(matrix)
    if bad is not None:
        number = numbers[bad]
        raise InvalidInputError(f"{source}: line {number}: 'vector' holds NaN or infinite values")
