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
hashed only when that signature changes, and each file's digest is kept for its signature (in
this process, and in a small file, ``digests.json`` under the user's cache folder, so that the
next process does not hash them again), so going back to a checkpoint that was seen before costs
no hashing. Nothing here imports torch.

A model's first version keeps the shard its name gives (``<slug>.db``, or ``ec_<name>``); each
later one gets a shard of its own, named by `versioned_name`. The choice is the pipeline's
(`embeddingcache.pipeline.Pipeline.shard_for`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
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
    "model_of",
    "probe_distance",
    "probe_version",
    "short",
    "versioned_name",
    "watch_for",
    "weights_exist",
]

# How stale a folder's version may be on the read path: a process that reads a hit this long
# after new weights were saved sees them (computing always checks first).
CHECK_INTERVAL_S = 1.0
# Files that cannot change a model's vectors: documentation, and hidden files (.git, editor state).
_IGNORED_SUFFIXES = (".md",)
_COMMIT = re.compile(r"[0-9a-f]{40}")
_HASH_CHUNK = 1 << 20

# (relative path, size, mtime, ctime, inode) of each file: a file rewritten in place with its
# mtime kept (cp -p) still has a new ctime.
Signature = tuple[tuple[str, int, int, int, int], ...]
Stamp = tuple[int, int, int, int]
# Files stat'ed on every read between two full checks: the largest one, the weights, which
# every save rewrites.
SENTINELS = 1


def short(version: str) -> str:
    """The part of a version that names a shard: 16 hex digits of its digest or commit."""
    return version.rsplit(":", 1)[-1][:16]


def versioned_name(model: str, version: str) -> str:
    """The shard name of a version of ``model`` that is not the one its own shard holds."""
    return f"{model}@{short(version)}"


_VERSIONED = re.compile(r"(.+)@[0-9a-f]{16}")


def model_of(shard: str) -> str:
    """The model a shard name belongs to: itself, or the model of a `versioned_name`."""
    found = _VERSIONED.fullmatch(shard)
    return found.group(1) if found else shard


def weights_exist(source: str, version: str) -> bool | None:
    """Whether the weights of ``version`` can still be loaded from ``source``: a folder's
    current files (a fine-tuned folder holds only its latest weights), or a Hub commit's
    snapshot in the local Hugging Face cache. ``None`` for a version known by its answers."""
    if version.startswith("sha256:"):
        folder = Path(source)
        return folder.is_dir() and watch_for(source).current(fresh=True) == version
    if version.startswith("commit:"):
        return hub_snapshot_exists(source, version)
    return None


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
    return tuple(sorted((name, *_stamp(st)) for name, st in _files(folder)))


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


# A file's digest for each (path, size, mtime, inode) seen in this process, or read from the
# memo file; the memo keeps the newest MEMO_ENTRIES of them.
_digests: dict[tuple[str, int, int, int, int], bytes] = {}
_digests_lock = threading.Lock()
_memo_loaded: set[Path] = set()
MEMO_ENTRIES = 10_000


def memo_path() -> Path:
    """Where file digests are kept between processes: ``$EMBEDDING_CACHE_DIGESTS``, else
    ``digests.json`` in ``$XDG_CACHE_HOME/embeddingcache`` (``~/.cache`` by default)."""
    named = os.environ.get("EMBEDDING_CACHE_DIGESTS")
    if named:
        return Path(named)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "embeddingcache" / "digests.json"


def _memo_key(key: tuple[str, int, int, int, int]) -> str:
    return "|".join(map(str, key))


def _load_memo(path: Path) -> None:
    """Read the memo file once per process (a missing or damaged one is an empty memo)."""
    if path in _memo_loaded:
        return
    _memo_loaded.add(path)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(saved, dict):
        return
    for key, value in saved.items():
        *name, size, mtime, ctime, inode = str(key).split("|")
        try:
            stamp = (int(size), int(mtime), int(ctime), int(inode))
            _digests.setdefault(("|".join(name), *stamp), bytes.fromhex(str(value)))
        except ValueError:
            continue


def _save_memo(path: Path) -> None:
    """Write the memo file, best effort (a read-only home only costs hashing again)."""
    newest = list(_digests.items())[-MEMO_ENTRIES:]
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".digests-")
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump({_memo_key(key): value.hex() for key, value in newest}, file)
        os.replace(temporary, path)


def _file_digest(path: Path, stamp: Stamp) -> bytes:
    key = (str(path), *stamp)
    memo = memo_path()
    with _digests_lock:
        _load_memo(memo)
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
    known = len(_digests)
    for name, *stamp in sig if sig is not None else signature(folder):
        total.update(name.encode("utf-8") + b"\0")
        total.update(_file_digest(folder / name, tuple(stamp)))  # type: ignore[arg-type]
    if len(_digests) != known:
        with _digests_lock:
            _save_memo(memo_path())
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


_watches: dict[str, VersionWatch] = {}
_watches_lock = threading.Lock()


def watch_for(source: str) -> VersionWatch:
    """The one `VersionWatch` of a model source (a folder or a Hub id) in this process."""
    with _watches_lock:
        watch = _watches.get(source)
        if watch is None:
            watch = _watches[source] = VersionWatch(source)
        return watch


@dataclass
class VersionWatch:
    """The current version of one model, checked cheaply.

    ``current()`` stats every file of a folder at most once per ``interval`` seconds, and in
    between only its ``SENTINELS`` largest file (the weights, which every save rewrites), so
    that a process sees new weights on its first call after they were saved; it hashes files
    only when their signature changed. ``current(fresh=True)`` always stats every file
    (before computing, so that no vector of new weights lands in the old version's shard).
    A Hub id's commit is read at most once per ``interval``.
    """

    source: str
    interval: float = CHECK_INTERVAL_S
    _checked: float = float("-inf")
    _signature: Signature | None = None
    _version: str | None = None
    _sentinels: tuple[tuple[str, Stamp], ...] = ()  # paths as str: os.stat, not Path.stat

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
            if not fresh and now - self._checked < self.interval and self._sentinels_hold():
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
                largest = sorted(sig, key=lambda entry: -entry[1])[:SENTINELS]
                self._sentinels = tuple(
                    (str(self._folder / name), (size, mtime, ctime, inode))
                    for name, size, mtime, ctime, inode in largest
                )
            return self._version

    def _sentinels_hold(self) -> bool:
        """Whether the largest files are as the last full check found them."""
        for path, stamp in self._sentinels:
            try:
                if _stamp(os.stat(path)) != stamp:
                    return False
            except OSError:
                return False
        return True
