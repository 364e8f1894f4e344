"""The per-export entry point: the exports partitions, the sensor that fills them, and ``cct_export``."""

from typing import Any

import dagster as dg

from animl_assets.assets.artifacts import artifact_key, markdown_table, write_json
from animl_assets.core.cct import CHECKS, CCTFormatError, category_location_table, load_cct, summarize_cct, validate_cct
from animl_assets.core.exports import ExportCursor, export_key_for, partition_key_for, select_new_exports
from animl_assets.resources.storage import StoreResource

exports_partitions = dg.DynamicPartitionsDefinition(name="exports")
EXPORT_ARTIFACT = "export.json"

CHECK_DESCRIPTIONS = {
    "schema": "Required keys are present and have the right types.",
    "unique_ids": "Image, annotation and category ids (and image file names, category names) are unique.",
    "references": "Every annotation points at an existing image and category.",
    "bboxes": "Every box lies inside its image.",
}


@dg.asset(
    partitions_def=exports_partitions,
    group_name="ingest",
    kinds={"json"},
    check_specs=[dg.AssetCheckSpec(name, asset="cct_export", blocking=True, description=CHECK_DESCRIPTIONS[name])
                 for name in CHECKS],
)
def cct_export(context: dg.AssetExecutionContext, exports: StoreResource,
               storage: StoreResource) -> dg.MaterializeResult:
    """The export's COCO Camera Traps JSON, copied verbatim and validated; downstream waits on its checks."""
    partition = context.partition_key
    source = exports.store()
    raw = source.read_bytes(export_key_for(partition))
    try:
        cct = load_cct(raw)
    except CCTFormatError as err:
        raise dg.Failure(
            description=f"export {source.uri(export_key_for(partition))} is malformed: {err}",
            metadata={"export": source.uri(export_key_for(partition)), "error": str(err)},
        ) from err
    report = validate_cct(cct)
    store = storage.store()
    store.write_bytes(artifact_key("cct_export", partition, EXPORT_ARTIFACT), raw)
    write_json(store, artifact_key("cct_export", partition, "validation.json"), report.problems)
    table = category_location_table(cct)
    check_results = [
        dg.AssetCheckResult(
            check_name=name,
            passed=not problems,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"problems": len(problems),
                      "examples": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems[:20]) or "none")},
        )
        for name, problems in report.problems.items()
    ]
    return dg.MaterializeResult(
        metadata={
            **{f"num_{name}": count for name, count in summarize_cct(cct).items()},
            "source": source.uri(export_key_for(partition)),
            "path": store.uri(artifact_key("cct_export", partition, EXPORT_ARTIFACT)),
            "problems": sum(map(len, report.problems.values())),
            "category_by_location": markdown_table(table.reset_index() if len(table) else table),
        },
        check_results=check_results,
    )


def make_new_exports_sensor(target: dg.JobDefinition | Any) -> dg.SensorDefinition:
    """A sensor that adds each new export in the exports location as a partition and runs ``target`` on it."""

    @dg.sensor(name="new_exports", target=target, minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING)
    def new_exports(context: dg.SensorEvaluationContext, exports: StoreResource) -> dg.SensorResult:
        """Watch the exports location (local folder or s3:// prefix) for new COCO Camera Traps files."""
        registered = set(context.instance.get_dynamic_partitions(exports_partitions.name))
        cursor = ExportCursor.parse(context.cursor)
        new, skipped, cursor = select_new_exports(exports.store().list(), cursor, registered)
        for key in skipped:
            context.log.warning(f"ignoring export {key!r}: its path is not a usable partition key")
        keys = [partition_key_for(item.key) for item in new]
        return dg.SensorResult(
            run_requests=[dg.RunRequest(partition_key=key, run_key=f"{key}@{item.mtime}")
                          for key, item in zip(keys, new)],
            dynamic_partitions_requests=[exports_partitions.build_add_request(keys)] if keys else [],
            cursor=cursor.serialize(),
        )

    return new_exports
