"""Bulk transfers against a store: one bounded pool of threads for every many-file read or write.

Object stores answer one small request in tens of milliseconds and many at once just as fast, so a loop of
sequential GETs or PUTs is the slowest way to move a folder. Every bulk operation (crop uploads, crops read
for training, evaluation and classification, garbage collection) goes through ``parallel_map`` with at most
``TRANSFER_WORKERS`` requests in flight, the size boto3's connection pool is given (``s3_client``).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from animl_assets.core.files import atomic_write
from animl_assets.core.paths import safe_relative_path
from animl_assets.core.store import Store

TRANSFER_WORKERS = 16

In = TypeVar("In")
Out = TypeVar("Out")


def parallel_map(fn: Callable[[In], Out], items: Iterable[In], workers: int = TRANSFER_WORKERS) -> Iterator[Out]:
    """``fn`` over ``items`` on at most ``workers`` threads, results in input order. At most ``2 * workers``
    items are in flight, so a long iterable is never materialized and memory stays bounded."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="transfer") as pool:
        pending: deque[Future[Out]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass(frozen=True)
class CacheReport:
    """What ``cache_files`` did: files fetched and already present, and the bytes the cache holds for them."""

    fetched: int
    reused: int
    bytes: int


def cache_files(store: Store, keys: Sequence[str], cache_dir: str | os.PathLike[str], *,
                sizes: dict[str, int] | None = None, workers: int = TRANSFER_WORKERS) -> CacheReport:
    """Make ``cache_dir/<key>`` a copy of each of ``keys`` in ``store``, fetching concurrently only what is
    missing (or, where ``sizes`` gives the stored size, held at another size). A key the store lacks is left
    out (the reader reports it). An explicit cache: it holds the named files only, never a whole folder."""
    root = Path(cache_dir)

    def one(key: str) -> tuple[bool, int]:
        target = root / safe_relative_path(key)
        expected = (sizes or {}).get(key)
        if target.is_file() and (expected is None or target.stat().st_size == expected):
            return False, target.stat().st_size
        try:
            data = store.read_bytes(key)
        except FileNotFoundError:
            return False, 0
        atomic_write(target, data)
        return True, len(data)

    fetched = reused = total = 0
    for was_fetched, size in parallel_map(one, keys, workers):
        fetched += was_fetched
        reused += not was_fetched and size > 0
        total += size
    return CacheReport(fetched, reused, total)
