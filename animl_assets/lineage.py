"""Lineage and retention of cross-export asset versions, read from the Dagster instance's event log.

A version's chain: ``splits`` records the ``classification_dataset`` version it read (Dagster's
``dagster/input_data_version/…`` tag); a dataset version records, per export partition, the crops
manifest version and the export's SHA-256 it read (``exports_read`` metadata); each export's
``cct_export`` materialization carries that SHA-256 as its data version.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping

import dagster as dg

from animl_assets.assets import ALL_ASSETS
from animl_assets.assets.dataset import READ_METADATA
from animl_assets.core.layout import version_folder
from animl_assets.core.store import Store
from animl_assets.core.transfers import parallel_map
from animl_assets.resources.io_manager import INPUT_VERSION_TAG, VERSION_METADATA, failed_blocking_checks
from animl_assets.resources.storage import LocalStore
from animl_assets.runs import IN_PROGRESS, process_gone

CROSS_EXPORT = ("classification_dataset", "splits", "classifier_checkpoint", "classifier_evaluation",
                "registered_model", "mislabeled_candidates")  # downstream last
DATA_VERSION_TAG = "dagster/data_version"


@dataclass
class Node:
    """One step of a lineage chain: an asset version (or an export partition) and where it came from."""

    asset: str
    version: str
    run_id: str
    time: str
    partition: str | None = None
    inputs: list[Node] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = {"asset": self.asset, "version": self.version, "run_id": self.run_id, "time": self.time}
        if self.partition is not None:
            data["partition"] = self.partition
        return data | {"inputs": [node.as_dict() for node in self.inputs]}

    def lines(self, depth: int = 0) -> Iterable[str]:
        where = f" [{self.partition}]" if self.partition else ""
        yield f"{'  ' * depth}{self.asset}{where} {self.version}  run {self.run_id[:8]} at {self.time}"
        for node in self.inputs:
            yield from node.lines(depth + 1)


@functools.cache
def upstream_map() -> dict[str, tuple[str, ...]]:
    """Each cross-export asset's cross-export inputs (the upstream values it loads, whose versions its
    materializations record), read off the asset definitions the Definitions hold."""
    by_key = {key.to_user_string(): definition for definition in ALL_ASSETS for key in definition.keys}

    def loaded(definition: dg.AssetsDefinition) -> Iterable[str]:  # inputs with a value, not bare deps
        for name, key in definition.keys_by_input_name.items():
            if not definition.op.ins[name].dagster_type.is_nothing and key.to_user_string() in CROSS_EXPORT:
                yield key.to_user_string()

    return {asset: tuple(loaded(by_key[asset])) for asset in CROSS_EXPORT}


def records(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> list[Any]:
    """Every materialization record of ``asset`` (of one partition), newest first."""
    records, cursor = [], None
    while True:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
            limit=500, cursor=cursor)
        records += page.records
        if not page.has_more:
            return records
        cursor = page.cursor


def newest_record(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> Any | None:
    """The newest materialization record of ``asset`` (of one partition), or None."""
    page = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1)
    return page.records[0] if page.records else None


def _node(record: Any, asset: str, version: str, partition: str | None = None) -> Node:
    time = datetime.fromtimestamp(record.timestamp, timezone.utc).isoformat(timespec="seconds")
    return Node(asset, version, record.run_id, time, partition)


def versions(instance: dg.DagsterInstance, asset: str) -> list[tuple[str, Any]]:
    """The distinct versions of a cross-export asset, newest first, each with its newest record."""
    seen: dict[str, Any] = {}
    for record in records(instance, asset):
        value = record.asset_materialization.metadata.get(VERSION_METADATA)
        if value is not None and value.value not in seen:
            seen[value.value] = record
    return list(seen.items())


def lineage(instance: dg.DagsterInstance, asset: str, version: str | None = None) -> Node:
    """The chain from ``asset``'s ``version`` (default: the newest) down to the export partitions."""
    if asset not in CROSS_EXPORT:
        raise ValueError(f"lineage starts at a cross-export asset ({', '.join(CROSS_EXPORT)}), not {asset!r}")
    known = dict(versions(instance, asset))
    if not known:
        raise ValueError(f"{asset} has no materialized version yet")
    version = version or next(iter(known))
    if version not in known:
        raise ValueError(f"{asset} has no version {version!r}; known: {', '.join(known)}")
    record = known[version]
    node = _node(record, asset, version)
    tags = record.asset_materialization.tags or {}
    for upstream in upstream_map()[asset]:
        if f"{INPUT_VERSION_TAG}{upstream}" in tags:
            node.inputs.append(lineage(instance, upstream, tags[f"{INPUT_VERSION_TAG}{upstream}"]))
    read = record.asset_materialization.metadata.get(READ_METADATA)
    for partition, versions_read in sorted((read.value if read else {}).items()):
        node.inputs.append(_export_node(instance, partition, versions_read["cct_export"]))
    return node


def _export_node(instance: dg.DagsterInstance, partition: str, sha256: str) -> Node:
    """The cct_export materialization of ``partition`` whose data version is ``sha256`` (the file read)."""
    for record in records(instance, "cct_export", partition):
        if (record.asset_materialization.tags or {}).get(DATA_VERSION_TAG) == sha256:
            return _node(record, "cct_export", sha256, partition)
    return Node("cct_export", sha256, "(not in this instance's history)", "", partition)


def leased(instance: dg.DagsterInstance) -> dict[str, set[str]]:
    """The cross-export versions runs in progress read or wrote (their loaded inputs and materializations),
    and the version each asset's next reader would load (the newest that passed its checks): ``gc`` keeps
    them, so it never removes what a running training reads."""
    in_use: dict[str, set[str]] = {asset: set() for asset in CROSS_EXPORT}
    running = [run for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS + [
        dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED])) if not process_gone(run)]
    for run in running:
        kinds = {dg.DagsterEventType.LOADED_INPUT, dg.DagsterEventType.ASSET_MATERIALIZATION}
        for record in instance.get_records_for_run(run.run_id, of_type=kinds).records:
            event = record.event_log_entry.dagster_event
            if event.event_type == dg.DagsterEventType.LOADED_INPUT:
                data = event.event_specific_data
                asset, value = data.input_name, (data.metadata or {}).get(VERSION_METADATA)  # inputs are named as assets
            else:
                asset = event.asset_key.to_python_identifier()
                value = event.event_specific_data.materialization.metadata.get(VERSION_METADATA)
            if asset in in_use and value is not None:
                in_use[asset].add(str(value.value))
    if running:
        for asset in CROSS_EXPORT:
            newest = next((v for v, record in versions(instance, asset)
                           if not failed_blocking_checks(instance, dg.AssetKey(asset), record.run_id)), None)
            in_use[asset].update([newest] if newest else [])
    return in_use


def collectable(instance: dg.DagsterInstance, keep: int, present: Callable[[str, str], bool],
                in_use: Mapping[str, Iterable[str]] | None = None) -> dict[str, list[str]]:
    """Versions of each cross-export asset beyond the newest ``keep`` that nothing kept depends on; only
    versions whose files are ``present(asset, version)`` count (removed ones stay in the event log).
    ``in_use`` names versions something outside the asset graph needs (registered models: see
    ``registry.kept_versions``); they are kept with what they were made from."""
    if keep < 1:
        raise ValueError("--keep must be at least 1")
    stored = {asset: [v for v, _ in versions(instance, asset) if present(asset, v)] for asset in CROSS_EXPORT}
    kept: dict[str, set[str]] = {asset: set((in_use or {}).get(asset, ())) for asset in CROSS_EXPORT}
    for asset in reversed(CROSS_EXPORT):  # downstream first: what a kept version read is kept too
        kept[asset].update(stored[asset][:keep])
        for version in kept[asset]:
            for node in lineage(instance, asset, version).inputs:
                if node.asset in kept:
                    kept[node.asset].add(node.version)
    return {asset: [v for v in stored[asset] if v not in kept[asset]] for asset in CROSS_EXPORT}


def remove_version(store: Store, asset: str, version: str) -> int:
    """Delete one version's files from the artifact store (and its folder, on a local disk); returns how many."""
    folder = version_folder(asset, version)
    files = [item.key for item in store.list(folder)]
    for _ in parallel_map(store.delete, files):  # concurrent: one request per object on S3
        pass
    if isinstance(store, LocalStore):
        shutil.rmtree(store.root / folder, ignore_errors=True)
    return len(files)
