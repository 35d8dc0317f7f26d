"""A backup's objects in an S3-compatible bucket, through boto3 (the ``s3`` extra).

``s3://bucket/prefix`` names the bucket and the key prefix. Where the bucket is and who may
write it come the way boto3 takes them, and from nowhere else: ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) for a store other than Amazon's (MinIO, Ceph, R2...),
``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and the shared config
files, an instance role. None of it is stored, logged or shown: botocore's errors are
translated into `BackupError` at this boundary, with the keys and every URL's userinfo and
query masked (`credentials.mask`), and kept as the cause only when they show none.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from .credentials import clean_cause, mask
from .errors import BackupError, InvalidInputError

__all__ = ["Bucket"]

_DELETE_BATCH = 1000  # keys per DeleteObjects request, S3's limit


class Bucket:
    """The objects under ``prefix/`` in one bucket."""

    remote = True

    def __init__(self, url: str) -> None:
        rest = url.split("://", 1)[1]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise InvalidInputError(f"{mask(url)} names no bucket: write s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        try:
            import boto3
            import botocore.exceptions
        except ImportError as exc:
            raise BackupError(
                f"a backup to s3:// needs boto3 ({exc}): pip install 'embeddingcache[s3]'"
            ) from None
        self._errors: tuple[type[BaseException], ...] = (
            botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError,
            boto3.exceptions.Boto3Error,
        )
        self._session = boto3.session.Session()
        try:
            self._client: Any = self._session.client("s3")
        except self._errors as exc:
            self._fail(f"cannot reach {self.describe()}", exc)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read(self, name: str) -> bytes | None:
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
            return bytes(answer["Body"].read())
        except self._errors as exc:
            if _missing(exc):
                return None
            self._fail(f"cannot read {self._key(name)} in {self.describe()}", exc)

    def write(self, name: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
        except self._errors as exc:
            self._fail(f"cannot write {self._key(name)} in {self.describe()}", exc)

    def has(self, name: str, size: int) -> bool:
        try:
            answer = self._client.head_object(Bucket=self.bucket, Key=self._key(name))
        except self._errors as exc:
            if _missing(exc):
                return False
            self._fail(f"cannot read {self._key(name)} in {self.describe()}", exc)
        return int(answer.get("ContentLength", -1)) == size

    def put(self, name: str, path: Path, progress: Callable[[int], None]) -> None:
        try:
            self._client.upload_file(str(path), self.bucket, self._key(name), Callback=progress)
        except self._errors as exc:
            self._fail(f"cannot send {self._key(name)} to {self.describe()}", exc)

    def get(self, name: str, path: Path, progress: Callable[[int], None]) -> None:
        try:
            self._client.download_file(self.bucket, self._key(name), str(path), Callback=progress)
        except self._errors as exc:
            if _missing(exc):
                raise BackupError(f"the backup at {self.describe()} lacks {name}") from None
            self._fail(f"cannot fetch {self._key(name)} from {self.describe()}", exc)

    def names(self, prefix: str) -> list[str]:
        start = self._key("")
        found: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            )
            for page in pages:
                found.extend(item["Key"][len(start) :] for item in page.get("Contents", []))
        except self._errors as exc:
            self._fail(f"cannot list {self.describe()}", exc)
        return sorted(found)

    def remove(self, names: list[str]) -> None:
        try:
            for first in range(0, len(names), _DELETE_BATCH):
                keys = [{"Key": self._key(n)} for n in names[first : first + _DELETE_BATCH]]
                self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True}
                )
        except self._errors as exc:
            self._fail(f"cannot remove old objects from {self.describe()}", exc)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A temporary folder (``TMPDIR``): each file is copied there, sent and removed, so
        room for the largest file is enough."""
        with tempfile.TemporaryDirectory(prefix="embeddingcache-backup-") as folder:
            yield Path(folder)

    def _fail(self, action: str, exc: BaseException) -> NoReturn:
        """Raise a `BackupError` for botocore's ``exc``, without a credential in it."""
        secrets = self._secrets()
        raise BackupError(f"{action}: {mask(str(exc), secrets)}") from clean_cause(exc, secrets)

    def _secrets(self) -> list[str | None]:
        """The credentials in use, to be masked wherever a message might show them."""
        try:
            found = self._session.get_credentials()
        except self._errors:
            return []
        if found is None:
            return []
        return [found.access_key, found.secret_key, found.token]

    def __repr__(self) -> str:
        return f"Bucket({self.describe()!r})"


def _missing(exc: BaseException) -> bool:
    """Whether S3 said the object is not there."""
    response = getattr(exc, "response", None)
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    return code in ("404", "NoSuchKey", "NotFound")
