"""The per-export entry point: the exports partitions, the sensor that fills them, and ``cct_export``."""

import hashlib
from typing import Any, Iterable, Iterator

import dagster as dg
from pydantic import Field

from animl_assets.assets.artifacts import location, stage_asset, stop, table
from animl_assets.assets.checks import problems_check
from animl_assets.core.ingest.cct import (
    BBOX_OVERHANG_TOLERANCE,
    CHECKS,
    SET_ASIDE,
    CCTFormatError,
    ExportArtifacts,
    as_ingested,
    category_location_table,
    export_profile,
    load_cct,
    summarize_cct,
    validate_cct,
)
from animl_assets.core.ingest.exports import ExportCursor, export_key_for, scan_exports
from animl_assets.core.review.sequences import crop_sequences
from animl_assets.resources.storage import ArtifactStore, ExportsLocation

exports_partitions = dg.DynamicPartitionsDefinition(name="exports")

CHECK_DESCRIPTIONS = {
    "schema": "Required keys are present and have the right types.",
    "unique_ids": "Image, annotation and category ids (and image file names, category names) are unique.",
    "references": "Every annotation points at an existing image and category.",
    "bboxes": "Every box has an area and lies inside its image, or overhangs it by at most the tolerance.",
}


class ExportConfig(dg.Config):
    """How strict the export's validation is."""

    bbox_overhang_tolerance: float = Field(
        default=BBOX_OVERHANG_TOLERANCE, ge=0, le=1,
        description="A box may reach past its image's edge by this share of the image's side (exporters round); "
                    "it is clipped and counted in the boxes_clipped warning. A larger overhang blocks the ingest.")


@stage_asset(partitions_def=exports_partitions,
    group_name="ingest",
    kinds={"json"},
    check_specs=[*(dg.AssetCheckSpec(name, asset="cct_export", blocking=True, description=CHECK_DESCRIPTIONS[name])
                   for name in CHECKS),
                 dg.AssetCheckSpec("boxes_clipped", asset="cct_export", blocking=False,
                                   description="Warns when boxes overhang their image within the tolerance "
                                               "(they are clipped)."),
                 dg.AssetCheckSpec(SET_ASIDE, asset="cct_export", blocking=False,
                                   description="Warns when annotations are left out because their box is null, "
                                               "malformed or has no area (validation.json lists each).")],)
def cct_export(context: dg.AssetExecutionContext, config: ExportConfig,
               exports: ExportsLocation) -> Iterator[dg.Output | dg.AssetCheckResult]:
    """The export's COCO Camera Traps JSON and its problems per check; downstream waits on its checks. Its
    data version is the export file's SHA-256."""
    partition = context.partition_key
    source = exports.store()
    raw = source.read_bytes(export_key_for(partition))
    try:
        cct = load_cct(raw)
    except CCTFormatError as err:
        raise stop(
            description=f"export {source.uri(export_key_for(partition))} is malformed: {err}",
            metadata={"export": source.uri(export_key_for(partition)), "error": str(err)},
        ) from err
    report = validate_cct(cct, bbox_tolerance=config.bbox_overhang_tolerance)
    by_location = category_location_table(cct)
    if report.clipped:
        context.log.warning(f"{len(report.clipped)} boxes overhang their image within the tolerance and are "
                            f"clipped, e.g. {report.clipped[0]}")
    set_aside = report.set_aside_by_reason()
    if set_aside:
        context.log.warning(f"{len(report.set_aside)} annotations left out: {set_aside}")
    counts, sha256, validation = summarize_cct(cct), hashlib.sha256(raw).hexdigest(), report.record()
    yield dg.Output(
        ExportArtifacts(as_ingested(cct, report), validation,
                        {"uri": source.uri(export_key_for(partition)), "sha256": sha256}),
        data_version=dg.DataVersion(sha256),
        metadata={
            **{f"num_{name}": count for name, count in counts.items()},
            "dagster/row_count": counts["images"],
            "sha256": sha256,
            "profile": export_profile(cct),
            "source": location(source.uri(export_key_for(partition))),
            "problems": sum(map(len, report.problems.values())),
            "num_annotations_set_aside": len(report.set_aside),
            "annotations_set_aside": dg.MetadataValue.json(set_aside),
            "category_by_location": table(by_location.reset_index() if len(by_location) else by_location),
        },
    )
    yield from (problems_check(name, problems) for name, problems in report.problems.items())
    yield problems_check("boxes_clipped", report.clipped, severity=dg.AssetCheckSeverity.WARN)
    yield problems_check(SET_ASIDE, validation[SET_ASIDE], severity=dg.AssetCheckSeverity.WARN)


def make_new_exports_sensor(target: dg.JobDefinition | Any) -> dg.SensorDefinition:
    """A sensor that adds each new export in the exports location as a partition and runs ``target`` on it,
    and runs it again on an export whose file (or MegaDetector results beside it) changed."""

    @dg.sensor(name="new_exports", target=target, minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Every 30 s, lists the JSON files in the exports location (ANIML_EXPORTS_URI, up to "
                           "the exports resource's max_depth folders deep). Each COCO Camera Traps export that "
                           "is not a partition yet becomes one and is ingested, whatever its file time; an "
                           "export edited in place (or its <name>.md.json) is ingested again.")
    def new_exports(context: dg.SensorEvaluationContext, exports: ExportsLocation) -> dg.SensorResult:
        registered = set(context.instance.get_dynamic_partitions(exports_partitions.name))
        scan = scan_exports(exports.list_exports(), ExportCursor.parse(context.cursor), registered)
        for key in scan.skipped:
            context.log.warning(f"ignoring export {key!r}: its path is not a usable partition key")
        for partition in scan.changed:
            context.log.info(f"export {partition!r} changed since it was ingested: ingesting it again")
        if scan.new:
            context.log.info(f"new exports: {scan.new}")
        return dg.SensorResult(
            run_requests=[dg.RunRequest(partition_key=p, run_key=scan.run_key(p)) for p in scan.new + scan.changed],
            dynamic_partitions_requests=[exports_partitions.build_add_request(scan.new)] if scan.new else [],
            cursor=scan.cursor.serialize(),
        )

    return new_exports


def export_sequences(storage: ArtifactStore, partitions: Iterable[str], crops: Iterable[str],
                     gap_s: float = 60.0) -> dict[str, str]:
    """``{crop path: sequence}`` for ``crops`` of ``partitions``, from their stored exports (``crop_sequences``)."""
    return crop_sequences({p: storage.load("cct_export", partition=p).export["images"] for p in partitions},
                          crops, gap_s)
