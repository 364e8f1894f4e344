"""Stores for artifacts, exports and images: a local folder, or an S3 prefix through dagster-aws."""

import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import dagster as dg
from botocore.exceptions import ClientError
from dagster_aws.s3 import S3Resource
from pydantic import Field

from animl_assets.core.files import TEMP_PREFIX, atomic_write
from animl_assets.core.paths import safe_relative_path
from animl_assets.core.store import Store, StoredFile


def _join(prefix: str, key: str) -> str:
    key = safe_relative_path(key) if key else ""
    return "/".join(part for part in (prefix, key) if part)


class LocalStore:
    """Files below a local folder; writes go to a temporary file that is then renamed into place."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    def _path(self, key: str) -> Path:
        return self.root / safe_relative_path(key) if key else self.root

    def uri(self, key: str = "") -> str:
        return str(self._path(key))

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no file at {path}")
        return path.read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        atomic_write(self._path(key), data)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stat(self, key: str) -> StoredFile | None:
        try:
            info = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return StoredFile(key, info.st_size, info.st_mtime)

    def list(self, prefix: str = "") -> Iterator[StoredFile]:
        base = self._path(prefix)
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith(TEMP_PREFIX):
                info = path.stat()
                yield StoredFile(path.relative_to(self.root).as_posix(), info.st_size, info.st_mtime)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def child(self, prefix: str) -> "LocalStore":
        return LocalStore(self._path(prefix))


class S3Store:
    """Objects below ``s3://bucket/prefix``; a PUT is atomic, so writes need no staging."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"no object at {self.uri(key)}") from err
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def stat(self, key: str) -> StoredFile | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return StoredFile(key, head["ContentLength"], head["LastModified"].timestamp())

    def list(self, prefix: str = "") -> Iterator[StoredFile]:
        full = self._key(prefix)
        start = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{full}/" if full else ""):
            for item in page.get("Contents", []):
                yield StoredFile(item["Key"][start:], item["Size"], item["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def child(self, prefix: str) -> "S3Store":
        return S3Store(self.client, self.bucket, self._key(prefix))


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into bucket and prefix."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI {uri!r} names no bucket")
    return bucket, prefix.strip("/")


def open_store(uri: str, s3: S3Resource | None = None) -> Store:
    """A store for a local path or an ``s3://bucket/prefix`` URI."""
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        return S3Store((s3 or S3Resource()).get_client(), bucket, prefix)
    return LocalStore(uri)


def read_uri(uri: str, s3: S3Resource | None = None) -> bytes:
    """The bytes of one file named by a local path or an ``s3://bucket/key`` URI."""
    folder, _, name = uri.rpartition("/")
    return open_store(folder or ".", s3).read_bytes(name)


class StoreResource(dg.ConfigurableResource):
    """A place for files: a local folder, or ``s3://bucket/prefix`` reached through dagster-aws."""

    uri: str
    s3: S3Resource | None = None
    cache_dir: str = Field(default="", description="Local working folder for stages that need files on "
                                                    "disk when the store is remote (default: the temp dir).")

    def store(self) -> Store:
        return open_store(self.uri, self.s3)

    def cache(self, *parts: str) -> Path:
        """A local working folder below ``cache_dir``."""
        return Path(self.cache_dir or Path(tempfile.gettempdir()) / "animl-cache").joinpath(*parts)
