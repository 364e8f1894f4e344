"""The file store protocol the core works against: local folders and S3 prefixes alike."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from animl_assets.core.files import TEMP_PREFIX, atomic_open, atomic_write
from animl_assets.core.paths import safe_relative_path

COPY_CHUNK = 1 << 20


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

    def read_start(self, key: str, length: int) -> bytes:
        """The file's first ``length`` bytes (all of it when shorter); FileNotFoundError when it does not exist."""
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


def join_key(prefix: str, key: str) -> str:
    """``prefix/key`` for an object store, ``key`` checked to stay below ``prefix``."""
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

    def read_start(self, key: str, length: int) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no file at {path}")
        with path.open("rb") as handle:
            return handle.read(length)

    def write_bytes(self, key: str, data: bytes) -> None:
        atomic_write(self._path(key), data)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        with open(path, "rb") as source, atomic_open(self._path(key)) as target:
            shutil.copyfileobj(source, target, COPY_CHUNK)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stat(self, key: str) -> StoredFile | None:
        try:
            info = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return StoredFile(key, info.st_size, info.st_mtime)

    def list(self, prefix: str = "", *, suffix: str = "", max_depth: int | None = None) -> Iterator[StoredFile]:
        base = self._path(prefix)
        if not base.is_dir():
            return
        folders = [(base, 0)]
        while folders:  # only names ending in suffix are stat'ed; folders beyond max_depth are not read
            folder, depth = folders.pop()
            with os.scandir(folder) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    if entry.is_dir(follow_symlinks=False):
                        if max_depth is None or depth < max_depth:
                            folders.append((Path(entry.path), depth + 1))
                    elif (entry.name.endswith(suffix) and not entry.name.startswith(TEMP_PREFIX)
                          and entry.is_file()):
                        info = entry.stat()
                        yield StoredFile(Path(entry.path).relative_to(self.root).as_posix(), info.st_size,
                                         info.st_mtime)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def child(self, prefix: str) -> "LocalStore":
        return LocalStore(self._path(prefix))
