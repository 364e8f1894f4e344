"""The artifact IO manager: assets' values as plain files in the artifact store, every cross-export
materialization an immutable version.

Built on the project's Store (a local folder, or S3 through dagster-aws' boto3 client) rather than
``dg.UPathIOManager``: UPath reaches S3 through s3fs, whose aiobotocore pins botocore to a narrow range
(3.10 wants botocore < 1.43.118; dagster-aws here brings 1.44), and the Store already has the atomic
local writes, the truncation-safe S3 reads and the incremental upload the data half relies on.

Layout: an unpartitioned asset's value goes to ``<asset>/<version>/`` where the version is the content
hash of its files (``content_version``): a new materialization with other data is a new folder, never
an overwrite. A partitioned asset's value goes to ``<asset>/<partition folder>/``. Downstream loads the
version of the upstream's latest materialization (its ``version`` metadata), so what an asset read is
what Dagster records as its input's data version: the version this run produced, else the newest whose
blocking checks passed (``input_version``).
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from animl_assets.core.artifact_files import content_version, to_files
from animl_assets.resources.storage import ArtifactStore, location

VERSION_METADATA = "version"
INPUT_VERSION_TAG = "dagster/input_data_version/"  # Dagster's tag: the data version a materialization read


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Stores assets' values as plain files (CSV, JSON, .npz; a dataclass as one file per field) in the
    artifact store; every materialization of a cross-export asset is a new immutable version."""

    storage: ArtifactStore

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        asset = context.asset_key.to_python_identifier()
        files = to_files(obj, context.asset_key.path[-1])
        partition = context.asset_partition_key if context.has_asset_partitions else None
        version = content_version(files)
        uri = self.storage.save(files, asset, partition=partition, version=version)
        context.add_output_metadata({VERSION_METADATA: version, "artifacts": location(uri)})

    def load_input(self, context: dg.InputContext) -> Any:
        asset = context.asset_key.to_python_identifier()
        expected = context.dagster_type.typing_type  # a record stored as a plain dict (older homes) loads into it
        if context.has_asset_partitions and context.has_partition_key:  # the same export's value
            partition = context.asset_partition_key
            if not self.storage.has(asset, partition=partition):
                name = context.asset_key.to_user_string()
                raise dg.Failure(f"{name} is not materialized for partition {partition!r}: materialize {name} first",
                                 allow_retries=False)
            return self.storage.load(asset, partition=partition, expected=expected)
        if context.has_asset_partitions:  # across exports: {partition: value} of those materialized so far
            return {p: self.storage.load(asset, partition=p) for p in context.asset_partition_keys
                    if self.storage.has(asset, partition=p)}
        version, how = input_version(context)
        context.add_input_metadata({VERSION_METADATA: version, "resolved": how})
        return self.storage.load(asset, version=version, expected=expected)


PIN_TAG = "animl/version/"  # a run tag animl/version/<asset> = <version> pins the version that run reads


def _run_chain(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """``run_id`` and the runs it re-executes, newest first (a retried run reads what its parent produced)."""
    chain = []
    while run_id and run_id not in chain:
        chain.append(run_id)
        run = instance.get_run_by_id(run_id)
        run_id = run.parent_run_id if run else None
    return chain


def _version_of(entry: Any) -> str | None:
    """The artifact version an event log entry's materialization wrote, if it is one."""
    value = entry.asset_materialization.metadata.get(VERSION_METADATA) if entry.asset_materialization else None
    return None if value is None else str(value.value)


def failed_blocking_checks(instance: dg.DagsterInstance, asset_key: dg.AssetKey, run_id: str) -> list[str]:
    """The blocking checks on ``asset_key`` that failed in run ``run_id`` (its materialization there is not an
    input for anything)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    evaluations = [r.event_log_entry.dagster_event.event_specific_data for r in records]
    return [e.check_name for e in evaluations if e.asset_key == asset_key and not e.passed and e.blocking
            and e.severity == dg.AssetCheckSeverity.ERROR]


def input_version(context: dg.InputContext) -> tuple[str, str]:
    """The version of the upstream asset this step reads, and how it was chosen: pinned by the run's
    ``animl/version/<asset>`` tag; else the one this run (or the run it re-executes) produced; else the newest
    materialization none of whose blocking checks failed. Never a version whose blocking check failed."""
    instance, key = context.instance, context.asset_key
    name = key.to_user_string()
    run = context.step_context.dagster_run if context.step_context else None
    pinned = run.tags.get(f"{PIN_TAG}{key.to_python_identifier()}") if run else None
    if pinned:
        return pinned, "pinned by the run's tag"
    for run_id in _run_chain(instance, run.run_id) if run else []:
        records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
        mine = [v for r in reversed(records) if r.event_log_entry.dagster_event.asset_key == key
                and (v := _version_of(r.event_log_entry)) is not None]
        if mine:
            if failed_blocking_checks(instance, key, run_id):
                raise dg.Failure(f"{name} failed a blocking check in this run: it is not an input", allow_retries=False)
            return str(mine[0]), "produced by this run"
    cursor, rejected = None, 0
    while True:
        page = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=50, cursor=cursor)
        for record in page.records:
            version = _version_of(record.event_log_entry)
            if version is None:
                continue
            if failed_blocking_checks(instance, key, record.run_id):
                rejected += 1
                continue
            return version, "newest that passed its blocking checks" + (f" ({rejected} newer failed)" if rejected else "")
        if not page.has_more:
            break
        cursor = page.cursor
    if rejected:
        raise dg.Failure(f"no version of {name} passed its blocking checks ({rejected} failed): fix its input and "
                         f"materialize {name} again", allow_retries=False)
    raise dg.Failure(f"{name} is not materialized yet: materialize {name} first", allow_retries=False)


def read_from(instance: dg.DagsterInstance, asset: str, version: str, upstream: str) -> set[str]:
    """The versions of ``upstream`` that materializations of ``asset`` at ``version`` read (Dagster's
    ``dagster/input_data_version`` tags): one per materialization that wrote this version."""
    found, cursor = set(), None
    while True:
        page = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset)), limit=200,
                                               cursor=cursor)
        for record in page.records:
            if _version_of(record.event_log_entry) == version:
                tag = (record.asset_materialization.tags or {}).get(f"{INPUT_VERSION_TAG}{upstream}")
                if tag:
                    found.add(tag)
        if not page.has_more:
            return found
        cursor = page.cursor
