"""The file store protocol the core works against: local folders and S3 prefixes alike."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Protocol


@dataclass(frozen=True)
class StoredFile:
    """One listed file: its key relative to the store root, its size, last-modified time and, where the
    store has one, its entity tag (S3's ETag changes with the content even within one second)."""

    key: str
    size: int
    mtime: float
    etag: str = ""


class Store(Protocol):
    """A folder of files addressed by relative POSIX keys (a local directory or an S3 prefix)."""

    def uri(self, key: str = "") -> str:
        """Where ``key`` lives, as a path or ``s3://`` URI."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """The file's bytes; FileNotFoundError when it does not exist."""
        ...

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write atomically: readers see the old file or the whole new one, never a part."""
        ...

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Copy a local file to ``key`` in a stream (memory does not grow with its size), atomically."""
        ...

    def exists(self, key: str) -> bool: ...

    def stat(self, key: str) -> StoredFile | None:
        """Size and mtime of ``key``, or None when it does not exist."""
        ...

    def list(self, prefix: str = "", *, suffix: str = "", max_depth: int | None = None) -> Iterator[StoredFile]:
        """Every file under ``prefix`` whose name ends with ``suffix``, recursively; with ``max_depth``,
        only in folders at most that many levels below ``prefix`` (deeper folders are never listed)."""
        ...

    def delete(self, key: str) -> None: ...

    def child(self, prefix: str) -> "Store":
        """The store rooted at ``prefix`` below this one."""
        ...
