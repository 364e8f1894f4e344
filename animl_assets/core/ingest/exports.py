"""The exports location: which files are exports, their partition keys, and the sensor's cursor."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

from animl_assets.core.layout import PARTITION_KEY
from animl_assets.core.paths import safe_relative_path
from animl_assets.core.store import StoredFile

EXPORT_SUFFIX = ".json"
# JSON files beside exports that are not exports: MegaDetector results ("mdcache") and sidecars.
MDCACHE_SUFFIX = ".md.json"
NOT_EXPORT_SUFFIXES = (MDCACHE_SUFFIX, "_md.json", ".mdcache.json")


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
    if not PARTITION_KEY.match(partition):
        raise ValueError(f"export path {export_key!r} may hold only letters, digits, '.', '_', '-' and '/'")
    return partition


def export_key_for(partition_key: str) -> str:
    """The export file's key in the exports location for a partition key."""
    return safe_relative_path(partition_key) + EXPORT_SUFFIX


def mdcache_key_for(export_key: str) -> str:
    """The key of the MegaDetector results that may lie beside an export: ``<export>.md.json``."""
    return export_key[: -len(EXPORT_SUFFIX)] + MDCACHE_SUFFIX


def fingerprint(item: StoredFile) -> str:
    """What identifies one version of a listed file: size, last-modified time and (S3) ETag."""
    return f"{item.size}:{item.mtime:.6f}:{item.etag}"


@dataclass(frozen=True)
class ExportCursor:
    """The sensor's memory: the fingerprint of each export (with its MegaDetector results) last seen."""

    seen: dict[str, str] = field(default_factory=dict)

    def serialize(self) -> str:
        return json.dumps({"seen": self.seen}, sort_keys=True)

    @classmethod
    def parse(cls, text: str | None) -> ExportCursor:
        """The cursor ``serialize`` wrote; an empty or older-format cursor remembers nothing."""
        data = json.loads(text) if text else {}
        return cls(dict(data.get("seen", {})))


@dataclass(frozen=True)
class ExportScan:
    """One look at the exports location: partitions to add, partitions whose export changed, file names
    that cannot be partition keys, and the cursor to keep."""

    new: list[str]
    changed: list[str]
    skipped: list[str]
    cursor: ExportCursor

    def run_key(self, partition: str) -> str:
        """A run key unique to this version of the export, so each version is ingested once."""
        return f"{partition}@{self.cursor.seen[partition]}"


def scan_exports(listed: Iterable[StoredFile], cursor: ExportCursor, registered: set[str]) -> ExportScan:
    """Compare the listed files with what the cursor remembers.

    Every export that is not yet a partition is new, however old its file time (copies keep old
    times). An export whose file or ``.md.json`` beside it changed since it was last seen is changed.
    A registered export the cursor has not seen yet (added by ``animl register``) is only remembered.
    """
    files = {item.key: item for item in listed}
    new, changed, skipped, seen = [], [], [], {}
    for key in sorted(files):
        if not is_export_key(key):
            continue
        try:
            partition = partition_key_for(key)
        except ValueError:
            skipped.append(key)
            continue
        sidecar = files.get(mdcache_key_for(key))
        seen[partition] = fingerprint(files[key]) + (f"+md:{fingerprint(sidecar)}" if sidecar else "")
        if partition not in registered:
            new.append(partition)
        elif partition in cursor.seen and cursor.seen[partition] != seen[partition]:
            changed.append(partition)
    kept = {p: f for p, f in cursor.seen.items() if p in registered and p not in seen}  # gone for now
    return ExportScan(new, changed, skipped, ExportCursor(kept | seen))
