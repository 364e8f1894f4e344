"""Atomic local file writes (the local store, the crop workers) and append-only progress journals."""

from __future__ import annotations

import csv
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, TextIO

TEMP_PREFIX = ".tmp-"


def _process_umask() -> int:
    """The process umask, read without changing it where Linux tells it (os.umask sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_process_umask()  # what open() would give a new file: mkstemp's 0600 is only for the temp


@contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary file renamed into place when the block
    ends without an error, removed otherwise. ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place: never half-written."""
    with atomic_open(path) as handle:
        handle.write(data)


class Journal:
    """Rows appended to a CSV file as work finishes, so a killed run leaves a record of what it finished.

    Appends are buffered and flushed at most every ``flush_s`` seconds (a kill loses at most that much
    of the record, never a file); a row cut short by a kill is ignored when the journal is read.
    Thread-safe.
    """

    def __init__(self, path: str | os.PathLike[str], columns: list[str], flush_s: float = 1.0) -> None:
        self.path, self.columns, self.flush_s = Path(path), list(columns), flush_s
        self._lock = threading.Lock()
        self._handle: TextIO | None = None
        self._last_flush = 0.0

    def read(self) -> list[dict[str, str]]:
        """The complete rows written so far (by this run or a killed earlier one)."""
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as handle:
            lines = handle.read().split("\n")[:-1]  # a last line without its newline is incomplete
        rows = list(csv.reader(lines))
        if not rows or rows[0] != self.columns:
            return []
        return [dict(zip(self.columns, row)) for row in rows[1:] if len(row) == len(self.columns)]

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        with self._lock:
            if self._handle is None:
                fresh = not self.path.is_file()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._handle = self.path.open("a", newline="")
                self._writer = csv.DictWriter(self._handle, self.columns, lineterminator="\n", extrasaction="ignore")
                if fresh:
                    self._writer.writeheader()
            self._writer.writerows({k: v.replace("\n", " ") if isinstance(v, str) else v for k, v in row.items()}
                                   for row in rows)  # one line per row: a cut line is recognisable
            if time.monotonic() - self._last_flush >= self.flush_s:
                self._handle.flush()
                self._last_flush = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None

    def remove(self) -> None:
        """Forget the record: the work it describes is now in a manifest."""
        self.close()
        self.path.unlink(missing_ok=True)


@contextmanager
def init_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive file lock on ``folder``/.animl-init.lock: processes that set up one store (a Dagster
    instance, an MLflow database) take turns, so none is created or migrated twice."""
    import fcntl

    folder = Path(folder).expanduser().absolute()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".animl-init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
