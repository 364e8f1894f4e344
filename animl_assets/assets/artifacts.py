"""Reading and writing an asset's artifacts as plain files under ``<root>/<asset>/<partition>/``."""

from __future__ import annotations

import base64
import functools
import inspect
import io
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import dagster as dg
import pandas as pd
from PIL import Image

from animl_assets.core.store import Store
from animl_assets.core.tables import read_csv as read_table
from animl_assets.k8s import GPU_TAGS
from animl_assets.core.transfers import cache_files
from animl_assets.resources.storage import ArtifactStore, LocalStore, location

# S3 and MLflow calls fail now and then (a dropped connection, a 503 while a server restarts): a step that
# talks to them runs again after about 2, 4 and 8 s. ``stop`` failures (bad input or config) are not retried.
NETWORK_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


# What fails the same way on every try (a bug, bad data, bad config): raised through ``retry_only_transient``
# as a Failure that retry policies let through, so only network-like errors use a step's retries.
DETERMINISTIC = (LookupError, TypeError, AttributeError, ValueError, AssertionError, ArithmeticError,
                 NotImplementedError)


def retry_only_transient(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an asset's function (below ``@dg.asset``) so that a DETERMINISTIC error stops the step at once,
    its traceback kept as the failure's ``traceback`` metadata, instead of being retried by NETWORK_RETRY."""
    def stopped(err: BaseException) -> dg.Failure:
        return dg.Failure(description=f"{type(err).__name__}: {err}", allow_retries=False,
                          metadata={"traceback": dg.MetadataValue.text(traceback.format_exc())})

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except DETERMINISTIC as err:
                raise stopped(err) from err
        return generator

    @functools.wraps(fn)
    def function(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DETERMINISTIC as err:
            raise stopped(err) from err
    return function


GPU_STEP = {"op_tags": GPU_TAGS, "tags": {"animl/accelerator": "gpu"}}  # Kubernetes: a GPU node, one GPU


def stage_asset(*, gpu: bool = False, **asset_args: Any) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    """``dg.asset`` with the project's step policy, stated once for every asset: network-like errors retried
    (NETWORK_RETRY), deterministic ones stopping the step at once (``retry_only_transient``), and with ``gpu``
    the tags that put the step on a GPU node."""
    def decorate(fn: Callable[..., Any]) -> dg.AssetsDefinition:
        return dg.asset(retry_policy=NETWORK_RETRY, **(GPU_STEP if gpu else {}), **asset_args)(retry_only_transient(fn))
    return decorate


def stage_op(**op_args: Any) -> Callable[[Callable[..., Any]], dg.OpDefinition]:
    """``dg.op`` with the same step policy as ``stage_asset``, for the steps of a graph-backed asset."""
    def decorate(fn: Callable[..., Any]) -> dg.OpDefinition:
        return dg.op(retry_policy=NETWORK_RETRY, **op_args)(retry_only_transient(fn))
    return decorate


def stage_check(**check_args: Any) -> Callable[[Callable[..., Any]], dg.AssetChecksDefinition]:
    """``dg.asset_check`` with the same step policy as ``stage_asset``."""
    def decorate(fn: Callable[..., Any]) -> dg.AssetChecksDefinition:
        return dg.asset_check(retry_policy=NETWORK_RETRY, **check_args)(retry_only_transient(fn))
    return decorate


def stop(description: str, metadata: dict[str, Any] | None = None) -> dg.Failure:
    """A failure another try cannot fix (bad input or config): retry policies let it through at once."""
    return dg.Failure(description=description, metadata=metadata, allow_retries=False)


def read_csv(store: Store, key: str) -> pd.DataFrame | None:
    """The CSV at ``key`` (an asset's own earlier manifest), or None when there is none yet."""
    try:
        data = store.read_bytes(key)
    except FileNotFoundError:
        return None
    return read_table(data)


_COLUMN_TYPES = {"i": "int", "u": "int", "f": "float", "b": "bool"}
THUMBNAIL_BYTES = 30_000  # the most an inline image may weigh in the event log (base64 included)


def _plain(value: Any) -> Any:
    """A table cell as the types TableRecord takes (numpy scalars unwrapped, NaN as None)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and value != value:
        return None
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def table_schema(frame: pd.DataFrame) -> dg.TableSchema:
    """The columns of ``frame`` with their types, as Dagster's UI shows them."""
    return dg.TableSchema(columns=[dg.TableColumn(str(name), _COLUMN_TYPES.get(dtype.kind, "string"))
                                   for name, dtype in frame.dtypes.items()])


def table(frame: pd.DataFrame, limit: int = 50) -> dg.TableMetadataValue:
    """A table for the UI with its schema; only the first ``limit`` rows (the artifact has them all)."""
    records = [dg.TableRecord({str(k): _plain(v) for k, v in row.items()})
               for row in frame.head(limit).to_dict("records")]
    return dg.MetadataValue.table(records, schema=table_schema(frame))


def thumbnail_markdown(png: bytes, alt: str, max_bytes: int = THUMBNAIL_BYTES) -> dg.MetadataValue:
    """A small JPEG preview of ``png`` inline in the UI, shrunk until its markdown fits ``max_bytes``."""
    with Image.open(io.BytesIO(png)) as image:
        image = image.convert("RGB")
        width = min(image.width, 480)
        while True:
            preview = image.resize((width, max(1, image.height * width // image.width)), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            preview.save(buffer, "JPEG", quality=70, optimize=True)
            text = f"![{alt}](data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()})"
            if len(text) <= max_bytes or width <= 32:
                return dg.MetadataValue.md(text)
            width = int(width * 0.8)


def image_metadata(store: Store, key: str, png: bytes, name: str, alt: str) -> dict[str, dg.MetadataValue]:
    """Store ``png`` as an artifact; metadata ``name`` (a small inline preview) and ``name_path`` (the file)."""
    store.write_bytes(key, png)
    return {name: thumbnail_markdown(png, alt), f"{name}_path": location(store.uri(key))}


def cached_crops(storage: ArtifactStore, paths: Sequence[str], folder: str = "crops") -> tuple[Path, dict[str, Any]]:
    """A local folder holding each of ``paths`` (``<partition folder>/<crop>``, as in classification_ds.csv) of
    the store's ``folder`` (crops, or the empty-or-not model's whole frames): the store's own folder when it is
    local; for S3, the explicit cache ``$ANIML_HOME/cache/<folder>``, filled with exactly these files through the
    transfer pool (only those missing are fetched). Returns the folder and metadata saying what the cache holds."""
    store = storage.store()
    if isinstance(store, LocalStore):
        return store.root / folder, {}
    root = storage.cache(folder)
    report = cache_files(store.child(folder), list(paths), root)
    return root, {"crop_cache": location(str(root)), "crop_cache_bytes": report.bytes,
                  "crops_fetched": report.fetched, "crops_cached_before": report.reused}
