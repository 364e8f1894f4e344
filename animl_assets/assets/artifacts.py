"""Reading and writing an asset's artifacts as plain files under ``<root>/<asset>/<partition>/``."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from animl_assets.core.files import TEMP_PREFIX, atomic_write
from animl_assets.core.store import Store
from animl_assets.resources.storage import LocalStore


def artifact_key(asset: str, partition: str | None, name: str) -> str:
    """The key of artifact ``name`` of ``asset`` (and ``partition``, when the asset is partitioned)."""
    return "/".join(part for part in (asset, partition, name) if part)


def write_json(store: Store, key: str, value: Any) -> None:
    store.write_bytes(key, json.dumps(value, indent=1, sort_keys=False).encode())


def read_json(store: Store, key: str) -> Any:
    return json.loads(store.read_bytes(key))


def write_csv(store: Store, key: str, frame: pd.DataFrame) -> None:
    store.write_bytes(key, frame.to_csv(index=False).encode())


def read_csv(store: Store, key: str) -> pd.DataFrame | None:
    """The CSV at ``key``, or None when there is none yet."""
    try:
        data = store.read_bytes(key)
    except FileNotFoundError:
        return None
    return pd.read_csv(io.BytesIO(data), keep_default_na=False, na_values=[""])


def markdown_table(frame: pd.DataFrame, limit: int = 50) -> dg.MetadataValue:
    """A table for the UI; long tables are cut to ``limit`` rows, saying how many were left out."""
    text = frame.head(limit).to_markdown(index=False) if len(frame) else "_none_"
    if len(frame) > limit:
        text += f"\n\n_… and {len(frame) - limit} more rows_"
    return dg.MetadataValue.md(text)


def local_folder(store: Store, cache_dir: Path) -> Path:
    """A local folder holding ``store``'s files: the folder itself for a local store, else ``cache_dir``
    synced from it (files already there with the same size are not downloaded again)."""
    if isinstance(store, LocalStore):
        return store.root
    for item in store.list():
        target = cache_dir / item.key
        if not (target.is_file() and target.stat().st_size == item.size):
            atomic_write(target, store.read_bytes(item.key))
            os.utime(target, (item.mtime, item.mtime))  # a copy is as old as its object: see publish
    return cache_dir


def publish(folder: Path, store: Store) -> int:
    """Upload the files of ``folder`` that ``store`` lacks, holds at another size, or holds older than
    the local file (written since it was synced down); returns how many were uploaded."""
    if isinstance(store, LocalStore) and store.root == folder:
        return 0
    present = {item.key: item for item in store.list()}
    uploaded = 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith(TEMP_PREFIX):
            continue
        key, stat = path.relative_to(folder).as_posix(), path.stat()
        remote = present.get(key)
        if remote is None or remote.size != stat.st_size or stat.st_mtime > remote.mtime + 1:
            store.write_bytes(key, path.read_bytes())
            uploaded += 1
    return uploaded


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    """A PNG shown inline in the Dagster UI."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")
