"""The exports location: which files are exports, their partition keys, and the sensor's cursor."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable

from animl_assets.core.paths import safe_relative_path
from animl_assets.core.store import StoredFile

EXPORT_SUFFIX = ".json"
# JSON files beside exports that are not exports: MegaDetector results ("mdcache") and sidecars.
NOT_EXPORT_SUFFIXES = (".md.json", "_md.json", ".mdcache.json")
_PARTITION_KEY = re.compile(r"^[A-Za-z0-9._\-/]+$")


def is_export_key(key: str) -> bool:
    """Whether a file in the exports location is a COCO Camera Traps export."""
    name = key.rsplit("/", 1)[-1]
    return (key.endswith(EXPORT_SUFFIX) and not key.endswith(NOT_EXPORT_SUFFIXES)
            and not name.startswith("."))


def partition_key_for(export_key: str) -> str:
    """The dynamic partition key of an export: its path in the exports location without '.json'."""
    key = safe_relative_path(export_key)
    if not is_export_key(key):
        raise ValueError(f"{export_key!r} is not an export (a '.json' file that is not MegaDetector output)")
    partition = key[: -len(EXPORT_SUFFIX)]
    if not _PARTITION_KEY.match(partition):
        raise ValueError(f"export path {export_key!r} may hold only letters, digits, '.', '_', '-' and '/'")
    return partition


def export_key_for(partition_key: str) -> str:
    """The export file's key in the exports location for a partition key."""
    return safe_relative_path(partition_key) + EXPORT_SUFFIX


@dataclass(frozen=True)
class ExportCursor:
    """The newest export handled so far, ordered by (last-modified, key)."""

    mtime: float = float("-inf")
    key: str = ""

    def serialize(self) -> str:
        return json.dumps({"mtime": self.mtime, "key": self.key})

    @classmethod
    def parse(cls, text: str | None) -> ExportCursor:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(float(data["mtime"]), str(data["key"]))


def select_new_exports(
    listed: Iterable[StoredFile], cursor: ExportCursor, registered: set[str]
) -> tuple[list[StoredFile], list[str], ExportCursor]:
    """Exports to add as partitions, files skipped as unusable names, and the advanced cursor.

    An export is new when it is newer than the cursor, or as new as the cursor (same last-modified
    time, so a later-listed twin is never missed); one already registered is never added twice.
    """
    new, skipped, newest = [], [], cursor
    for item in sorted(listed, key=lambda f: (f.mtime, f.key)):
        if not is_export_key(item.key) or item.mtime < cursor.mtime:
            continue
        try:
            partition = partition_key_for(item.key)
        except ValueError:
            skipped.append(item.key)
            continue
        if partition not in registered:
            new.append(item)
            registered = registered | {partition}
        if (item.mtime, item.key) > (newest.mtime, newest.key):
            newest = ExportCursor(item.mtime, item.key)
    return new, skipped, newest
