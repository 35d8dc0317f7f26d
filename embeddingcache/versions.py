"""A model's version: what tells two sets of weights apart when the model's name stays the same.

A model keeps its name when it is fine-tuned and saved to the same folder, when its Hub id gets a
new commit, or when the model behind an API name is replaced. Its vectors change; the cache must
never serve the old ones for it. So every shard belongs to one *version* of its model:

- a local folder: ``"sha256:<hex>"``, a digest of every file in it that can change the vectors
  (all files but hidden ones and ``*.md``), by relative path and content;
- a Hub id: ``"commit:<sha>"``, the commit that the Hugging Face cache resolves the id to, which
  is the one sentence-transformers loads;
- a model behind an API: ``"probe:<hex>"``, named by its answers to a small fixed probe, and
  the same version as long as it answers within ``PROBE_TOLERANCE`` of them.

Cheap where it must be: a folder is checked by ``stat`` (size, mtime, inode of each file), at
most once per ``CHECK_INTERVAL_S`` on the read path and always before computing; its files are
hashed only when that signature changes, and each file's digest is kept for its signature, so
going back to a checkpoint that was seen before costs no hashing. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CHECK_INTERVAL_S",
    "PROBE",
    "PROBE_TOLERANCE",
    "VersionWatch",
    "folder_version",
    "hub_commit",
    "hub_version",
    "probe_distance",
    "probe_version",
    "short",
]

# How stale a folder's version may be on the read path: a process that reads a hit this long
# after new weights were saved sees them (computing always checks first).
CHECK_INTERVAL_S = 1.0
# Files that cannot change a model's vectors: documentation, and hidden files (.git, editor state).
_IGNORED_SUFFIXES = (".md",)
_COMMIT = re.compile(r"[0-9a-f]{40}")
_HASH_CHUNK = 1 << 20

Signature = tuple[tuple[str, int, int, int], ...]


def short(version: str) -> str:
    """The part of a version that names a shard: 16 hex digits of its digest or commit."""
    return version.rsplit(":", 1)[-1][:16]


def _files(folder: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every file under ``folder`` that may change the vectors, by relative path, with its stat."""
    stack = [folder]
    while stack:
        here = stack.pop()
        with os.scandir(here) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=True):
                    stack.append(Path(entry.path))
                elif not entry.name.endswith(_IGNORED_SUFFIXES):
                    yield (
                        Path(entry.path).relative_to(folder).as_posix(),
                        entry.stat(follow_symlinks=True),
                    )


def signature(folder: Path) -> Signature:
    """What ``stat`` says of a folder's files: it changes when any of them is rewritten."""
    return tuple(
        sorted((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in _files(folder))
    )


# A file's digest for each (path, size, mtime, inode) seen in this process.
_digests: dict[tuple[str, int, int, int], bytes] = {}
_digests_lock = threading.Lock()


def _file_digest(path: Path, stamp: tuple[int, int, int]) -> bytes:
    key = (str(path), *stamp)
    with _digests_lock:
        found = _digests.get(key)
    if found is None:
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while chunk := file.read(_HASH_CHUNK):
                digest.update(chunk)
        found = digest.digest()
        with _digests_lock:
            _digests[key] = found
    return found


def folder_version(folder: Path, sig: Signature | None = None) -> str:
    """The version of the model saved in ``folder``: a digest of its files' names and contents."""
    total = hashlib.sha256()
    for name, size, mtime, inode in sig if sig is not None else signature(folder):
        total.update(name.encode("utf-8") + b"\0")
        total.update(_file_digest(folder / name, (size, mtime, inode)))
    return "sha256:" + total.hexdigest()


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit the local Hugging Face cache resolves ``repo_id`` at ``revision`` to (the one
    sentence-transformers loads when it does not download), or ``None`` if it holds none."""
    revision = revision or "main"
    if _COMMIT.fullmatch(revision):
        return revision
    repo = _hub_cache() / ("models--" + repo_id.replace("/", "--"))
    try:
        commit = (repo / "refs" / revision).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def hub_version(repo_id: str, revision: str | None = None) -> str | None:
    commit = hub_commit(repo_id, revision)
    return None if commit is None else "commit:" + commit


def hub_snapshot_exists(repo_id: str, version: str) -> bool:
    """Whether the Hugging Face cache still holds the weights of a ``commit:`` version."""
    repo = _hub_cache() / ("models--" + repo_id.replace("/", "--"))
    return (repo / "snapshots" / version.removeprefix("commit:")).is_dir()


# A model known only by its answers (behind an API) is versioned by these texts' vectors.
PROBE = (
    "The quick brown fox jumps over the lazy dog.",
    "embeddingcache probe 0123456789",
    "Ein kurzer deutscher Satz.",
)
# The probe's vectors may differ by this much (1 - cosine, per text) and still be the same model.
# Measured on all-MiniLM-L6-v2 (docs/storage.md): one text alone against a padded batch 1e-7,
# float16 against float32 1.1e-6, bfloat16 against float32 6.3e-5; one AdamW step at a
# fine-tuning learning rate (2e-5) moves it 6.6e-4, and ten steps 4.3e-2.
PROBE_TOLERANCE = 1e-4


def probe_distance(stored: np.ndarray, fresh: np.ndarray) -> float:
    """The largest ``1 - cosine`` between two answers to the probe, row by row."""
    if stored.shape != fresh.shape:
        return float("inf")
    a = stored.astype(np.float64)
    b = fresh.astype(np.float64)
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.max(1.0 - cosine))


def probe_version(fresh: np.ndarray) -> str:
    """A new version's name for a model known by its answers: a digest of the probe's vectors."""
    return "probe:" + hashlib.sha256(np.ascontiguousarray(fresh, dtype="<f4").tobytes()).hexdigest()


@dataclass
class VersionWatch:
    """The current version of one model, checked cheaply.

    ``current()`` stats the model's files at most once per ``interval`` seconds and hashes
    them only when their signature changed; ``current(fresh=True)`` always stats (before
    computing, so that no vector of new weights lands in the old version's shard).
    """

    source: str
    interval: float = CHECK_INTERVAL_S
    _checked: float = float("-inf")
    _signature: Signature | None = None
    _version: str | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        path = Path(self.source)
        self._folder = path if path.is_absolute() and path.is_dir() else None

    @property
    def is_folder(self) -> bool:
        return self._folder is not None

    def current(self, *, fresh: bool = False) -> str | None:
        now = time.monotonic()
        with self._lock:
            if not fresh and now - self._checked < self.interval:
                return self._version
            self._checked = now
            if self._folder is None:
                self._version = hub_version(self.source)
                return self._version
            try:
                sig = signature(self._folder)
            except OSError:
                # The folder is gone or unreadable: no version can be vouched for.
                self._signature, self._version = None, None
                return None
            if sig != self._signature or self._version is None:
                self._version = folder_version(self._folder, sig)
                self._signature = sig
            return self._version
