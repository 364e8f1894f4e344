"""``md_detections``: MegaDetector batch output for an export, from its own boxes and detector results."""

import json
from typing import Iterator

import dagster as dg
import pandas as pd
from pydantic import Field

from animl_assets.assets.artifacts import stage_asset, stop, table
from animl_assets.assets.checks import problems_check
from animl_assets.assets.exports import exports_partitions
from animl_assets.assets.images import image_store
from animl_assets.core.artifact_files import value_version
from animl_assets.core.detect.detector import DetectorUnavailable, run_megadetector
from animl_assets.core.detect.megadetector import (
    Detections,
    box_labels,
    cct_to_md,
    images_without_boxes,
    merge_detections,
    upgrade_batch_output,
    validate_batch_output,
)
from animl_assets.core.ingest.cct import ExportArtifacts
from animl_assets.core.ingest.exports import export_key_for, mdcache_key_for
from animl_assets.core.ingest.images import ImageManifest, upright_sizes, usable_images
from animl_assets.resources.storage import ArtifactStore, ExportsLocation, ImageSource


class DetectionsConfig(dg.Config):
    """Where detections come from besides the export's own boxes."""

    use_mdcache: bool = Field(default=True, description="Merge MegaDetector results found beside the export "
                                                        "as <export>.md.json (any format_version from 1.1).")
    run_detector: bool = Field(default=False, description="Run MegaDetector (extra [detector]) on the "
                                                          "images present that have no box yet, streamed from "
                                                          "their source.")
    detector_weights: str = Field(default="", description="Path of the MegaDetector weights file.")
    detector_threshold: float = Field(default=0.005, ge=0, le=1)


@stage_asset(partitions_def=exports_partitions, group_name="detections", kinds={"json"},
    check_specs=[dg.AssetCheckSpec("md_format", asset="md_detections", blocking=True,
                                   description="The batch output follows MegaDetector's format rules "
                                               "(validate_batch_results.py).")])
def md_detections(context: dg.AssetExecutionContext, config: DetectionsConfig, cct_export: ExportArtifacts,
                  images: ImageManifest, storage: ArtifactStore, exports: ExportsLocation,
                  image_source: ImageSource) -> Iterator[dg.Output | dg.AssetCheckResult]:
    """MegaDetector batch output (format 1.4): the export's boxes (cct_to_md, conf 1.0) merged with ingested
    or freshly run detector results; the export's boxes win for the same image."""
    partition = context.partition_key
    cct = cct_export.export
    sizes = upright_sizes(images.manifest)
    md = cct_to_md(cct, image_sizes=sizes)
    detector, mdcache_problems, sources = None, [], {"export boxes": len(md["images"])}

    mdcache_key, exports_store = mdcache_key_for(export_key_for(partition)), exports.store()
    if config.use_mdcache and exports_store.exists(mdcache_key):
        try:
            raw = json.loads(exports_store.read_bytes(mdcache_key))
        except json.JSONDecodeError as err:
            raise stop(f"MegaDetector results {exports_store.uri(mdcache_key)} are not valid JSON: {err}") from err
        mdcache_problems = validate_batch_output(raw)
        detector = upgrade_batch_output(raw)
        sources["ingested"] = len(detector.get("images", []))
        context.log.info(f"ingested {sources['ingested']} images from {mdcache_key}")

    if config.run_detector:
        covered = {image["file"] for image in md["images"]} | {i["file"] for i in (detector or {}).get("images", [])}
        listed = usable_images(images.manifest)
        keys = dict(zip(listed["file_name"].astype(str), listed["source_key"]))
        todo = [file for file in images_without_boxes(cct) if file in keys and file not in covered]
        try:  # streamed from the images' source (a chunk at a time on local disk), never mirrored
            ran = run_megadetector(config.detector_weights, image_store(images, storage, partition, exports,
                                                                        image_source),
                                   todo, threshold=config.detector_threshold, keys=keys)
        except DetectorUnavailable as err:
            raise stop(str(err)) from err
        sources["detector run"] = len(ran["images"])
        detector = ran if detector is None else merge_detections(ran, detector)

    if detector is not None:
        md = merge_detections(md, detector)
    problems = validate_batch_output(md)
    labels = box_labels(cct, md)
    listed = {image["file"] for image in md["images"]}
    no_boxes = [file for file in images_without_boxes(cct) if file not in listed]
    detections = sum(len(image.get("detections") or []) for image in md["images"])
    value = Detections(md, labels, no_boxes)
    yield dg.Output(
        value, data_version=dg.DataVersion(value_version(Detections(  # not the conversion's time
            {**md, "info": {k: v for k, v in md["info"].items() if k != "detection_completion_time"}},
            labels, no_boxes), "md_detections")),
        metadata={
            "num_images": len(md["images"]),
            "num_detections": detections,
            "num_failures": sum(image.get("failure") is not None for image in md["images"]),
            "num_images_without_boxes": len(no_boxes),
            "num_empty_images": sum(image.get("detections") == [] for image in md["images"]),
            "sources": dg.MetadataValue.json(sources),
            "detector": md["info"]["detector"],
            "dagster/row_count": len(labels),
            "ingested_file_problems": table(pd.DataFrame({"problem": mdcache_problems}, dtype=str)),
        },
    )
    yield problems_check("md_format", problems)
