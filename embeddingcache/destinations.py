"""Where a backup is kept: a folder, or an S3-compatible bucket (``s3://bucket/prefix``,
`embeddingcache.s3`). Both hold named objects, written whole or not at all; `backup.py`
decides what the names are.

A folder is written through a hidden staging folder inside it: a copy is made there and moved
into place (one rename, on the same file system), so a reader never sees half an object.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from .errors import BackupError, InvalidInputError

__all__ = ["Destination", "Folder", "destination"]

Progress = Callable[[int], None]
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class Destination(Protocol):
    """A place that holds a backup's objects, by name (``a/b`` paths, ``/`` separated).

    Every method raises `BackupError` when the place cannot be read or written; its message
    never holds a credential.
    """

    remote: bool
    """Whether an object is sent over the network (a progress bar counts it)."""

    def describe(self) -> str: ...
    def read(self, name: str) -> bytes | None: ...
    def write(self, name: str, data: bytes) -> None: ...
    def has(self, name: str, size: int) -> bool: ...
    def put(self, name: str, path: Path, progress: Progress) -> None: ...
    def get(self, name: str, path: Path, progress: Progress) -> None: ...
    def names(self, prefix: str) -> list[str]: ...
    def remove(self, names: list[str]) -> None: ...
    def staging(self) -> AbstractContextManager[Path]: ...


def destination(where: str | os.PathLike[str]) -> Destination:
    """The destination a user named: ``s3://bucket/prefix``, or a folder.

    Raises:
        InvalidInputError: a URL of another scheme, or an S3 URL without a bucket.
        BackupError: ``s3://`` without boto3 installed.
    """
    if isinstance(where, str) and (scheme := _SCHEME.match(where)):
        if scheme.group(1).lower() != "s3":
            raise InvalidInputError(
                f"a backup goes to a folder or to s3://bucket/prefix, not {scheme.group(0)}"
            )
        from .s3 import Bucket

        return Bucket(where)
    return Folder(Path(where))


class Folder:
    """A folder on this machine (created when first written)."""

    remote = False

    def __init__(self, path: Path) -> None:
        self.path = Path(path).absolute()

    def describe(self) -> str:
        return str(self.path)

    def _path(self, name: str) -> Path:
        return self.path.joinpath(*name.split("/"))

    def read(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BackupError(f"cannot read {self._path(name)}: {exc}") from exc

    def write(self, name: str, data: bytes) -> None:
        with self.staging() as folder:
            (folder / "object").write_bytes(data)
            self.put(name, folder / "object", lambda _: None)

    def has(self, name: str, size: int) -> bool:
        path = self._path(name)
        return path.is_file() and path.stat().st_size == size

    def put(self, name: str, path: Path, progress: Progress) -> None:
        """Move ``path`` (a file in `staging`) into place as ``name``."""
        target = self._path(name)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "rb+") as file:
                os.fsync(file.fileno())
            os.replace(path, target)
        except OSError as exc:
            raise BackupError(f"cannot write {target}: {exc}") from exc
        progress(target.stat().st_size)

    def get(self, name: str, path: Path, progress: Progress) -> None:
        source = self._path(name)
        try:
            with open(source, "rb") as reading, open(path, "wb") as writing:
                while chunk := reading.read(1 << 20):
                    writing.write(chunk)
                    progress(len(chunk))
        except FileNotFoundError as exc:
            raise BackupError(f"the backup lacks {source}: {exc.strerror}") from exc
        except OSError as exc:
            raise BackupError(f"cannot read {source}: {exc}") from exc

    def names(self, prefix: str) -> list[str]:
        top = self._path(prefix)
        if not top.is_dir():
            return []
        return sorted(p.relative_to(self.path).as_posix() for p in top.rglob("*") if p.is_file())

    def remove(self, names: list[str]) -> None:
        for name in names:
            self._path(name).unlink(missing_ok=True)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A hidden folder inside this one, removed afterwards: what is made there is moved
        into place by a rename."""
        folder = self.path / f".staging-{secrets.token_hex(4)}"
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise BackupError(f"cannot write to {self.path}: {exc}") from exc
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
