"""CSV tables as this project writes and reads them: id-like columns stay the exact strings they were."""

from __future__ import annotations

import io

import pandas as pd

# Columns that hold names and ids: read as text, so "001", "1e3", "NA" or "true" never become numbers,
# floats, missing values or booleans on the way from one asset to the next.
ID_COLUMNS = ("path", "dataset", "location", "dataset_class", "label", "labels", "file", "file_name", "image_id",
              "image", "crop", "category", "status", "error", "source", "mode")


def read_csv(data: bytes | str, text: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV table with the ID_COLUMNS it has, and the ``text`` columns, as strings (empty cells missing); other
    columns inferred."""
    buffer = io.BytesIO(data) if isinstance(data, bytes) else io.StringIO(data)
    return pd.read_csv(buffer, dtype={name: str for name in (*ID_COLUMNS, *text)}, keep_default_na=False,
                       na_values=[""])
