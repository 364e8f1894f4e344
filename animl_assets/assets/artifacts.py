"""Reading and writing an asset's artifacts as plain files under ``<root>/<asset>/<partition>/``."""

from __future__ import annotations

import io
import json
from typing import Any

import dagster as dg
import pandas as pd

from animl_assets.core.store import Store


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
