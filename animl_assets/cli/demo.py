"""``animl demo`` and ``animl sample-export``: the sample export, end to end up to a champion model."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from animl_assets.cli.common import CliError, load_run_config
from animl_assets.cli.jobs import build_dataset, classify_export, known_partitions, materialize_export, train
from animl_assets.registration import register_export
from animl_assets.settings import DAGSTER_HOME_VAR, Settings

DEMO_IMAGES_PER_CLASS_AND_LOCATION = 4  # about 200 crops: enough for train, val and test to mean something
# Small enough for a 2-core laptop in well under a minute: Lite0's packaged ImageNet weights (offline), the head
# fine-tuned at 128 px.
DEMO_TRAINING = {"model_name": "efficientnet-lite0", "pretrained": "lite0", "image_size": 128, "epochs": 10,
                 "finetune": 10, "batch_size": 16, "num_workers": 2, "progress_every": 0}
# `animl demo --challenger`: a deliberately worse config (no pretrained weights, two epochs, no label
# weighting), to watch the champion gate keep the champion.
DEMO_CHALLENGER = DEMO_TRAINING | {"pretrained": "false", "epochs": 2, "finetune": 0, "label_weighted": False}


def _registry_line(settings: Settings) -> str:
    from animl_assets.core.registry import registry
    from animl_assets.resources import build_resources

    client = build_resources(settings)["mlflow"].connect()
    aliases = {alias: registry.by_alias(client, registry.DEFAULT_MODEL, alias)
               for alias in (registry.CHAMPION, registry.CHALLENGER)}
    found = ", ".join(f"{alias} = version {v.version}" for alias, v in aliases.items() if v)
    return f"{registry.DEFAULT_MODEL}: {found or 'no versions'}"


def _step(user: dict[str, Any], assets: list[Any], own: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The run config of one demo step: the demo's own config of the step's assets, with the user's
    (``--run-config``) over it, key by key."""
    ops = {}
    for name in sorted({key.to_user_string() for asset in assets for key in asset.keys}):
        config = {**(own or {}).get(name, {}), **(((user.get("ops") or {}).get(name) or {}).get("config") or {})}
        if config:
            ops[name] = {"config": config}
    return {"ops": ops} if ops else {}


def run_demo(settings: Settings, challenger: bool = False, user: dict[str, Any] | None = None) -> int:
    """Generate the sample export, register it and materialize every asset up to a champion model; with
    ``challenger``, train a worse model on the same data and let the gate keep the champion. ``user``: run
    config over the demo's own, for any of its steps (a quicker training, say)."""
    from animl_assets.assets import (
        DATASET_ASSETS,
        PER_EXPORT_ASSETS,
        REVIEW_ACROSS_EXPORTS,
        REVIEW_ASSETS,
        TRAINING_ASSETS,
    )
    from animl_assets.core.ingest.sample import EXPORT_NAME, write_sample_export
    from animl_assets.core.layout import partition_folder

    user, training = user or {}, [*TRAINING_ASSETS, *REVIEW_ACROSS_EXPORTS]

    started = time.perf_counter()
    if challenger:
        if not known_partitions():
            raise CliError("run animl demo first: --challenger trains on its dataset")
        print("[1/1] training a deliberately worse model (no pretrained weights, 2 epochs) -> evaluation -> "
              "registry -> champion gate")
        promoted = train(_step(user, training, {"classifier_checkpoint": DEMO_CHALLENGER}))
        print(f"\nthe new version {'became champion' if promoted else 'stays challenger'}; "
              f"{_registry_line(settings)}")
        return 0
    export_dir = Path(settings.exports_uri) / "sample"
    if settings.exports_uri.startswith("s3://"):
        export_dir = settings.home / "sample_export"
    print(f"[1/6] writing the sample export to {export_dir}")
    sample = write_sample_export(export_dir, images_per_class_and_location=DEMO_IMAGES_PER_CLASS_AND_LOCATION)
    print(f"      {sample.images} images, {sample.annotations} annotations, "
          f"{len(sample.broken_files)} deliberately broken files")
    print("[2/6] registering it as a partition of 'exports'")
    partition = register_export(settings, str(export_dir / EXPORT_NAME))
    print(f"      partition: {partition}")
    print("[3/6] materializing cct_export -> images -> md_detections -> crops")
    materialize_export(partition, _step(user, PER_EXPORT_ASSETS))
    print("[4/6] materializing classification_dataset -> splits (all exports)")
    build_dataset(_step(user, DATASET_ASSETS))
    print(f"[5/6] classifier_checkpoint ({DEMO_TRAINING['model_name']}, MLflow run) -> classifier_evaluation -> "
          "registered_model -> beats_champion -> champion_model")
    train(_step(user, training, {"classifier_checkpoint": DEMO_TRAINING}))
    print("[6/6] classifying the export with the champion: classifications (unknowns, drift check) -> "
          "classified_detections (MegaDetector JSON for Timelapse) -> review_queue")
    classify_export(partition, _step(user, REVIEW_ASSETS, {"classified_detections": {"label_pos": "last"}}))
    print(f"\ndone in {time.perf_counter() - started:.1f}s")
    print(f"artifacts:    {settings.storage_uri}")
    print(f"dagster home: {os.environ[DAGSTER_HOME_VAR]}")
    print(f"registry:     {_registry_line(settings)}")
    artifacts = settings.storage_uri.rstrip("/")
    print(f"for Timelapse: {artifacts}/classified_detections/{partition_folder(partition)}/classified_detections.json")
    print(f"to review:    {artifacts}/review_queue/{partition_folder(partition)}/review_queue.md.json (and .csv)")
    print("open the UI:  make ui   (then http://127.0.0.1:3000); MLflow: animl mlflow-ui")
    print("next:         animl demo --challenger   (a worse model: the gate keeps the champion)")
    return 0


def run_sample_export(args: argparse.Namespace, _settings: Settings) -> int:
    if args.format == "animl":
        from animl_assets.core.ingest.sample_animl import ARCHIVE, write_animl_export

        result = write_animl_export(args.dir, seed=args.seed)
        print(f"wrote {result.path}: {result.images} images, {result.annotations} annotations, the images under "
              f"their serving_bucket_key in {Path(args.dir) / ARCHIVE}")
        print(f"next: animl register {result.path} --images-root {Path(args.dir) / ARCHIVE}")
        return 0
    from animl_assets.core.ingest.sample import write_sample_export

    result = write_sample_export(args.dir, seed=args.seed, behaviours=args.behaviours,
                                 empties_per_location=args.empties_per_location)
    print(f"wrote {result.path}: {result.images} images, {result.annotations} annotations"
          + (" (with count and behaviour fields, some missing)" if args.behaviours else ""))
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """``sample-export`` and ``demo``."""
    sample = commands.add_parser("sample-export", help="write the deterministic sample export into DIR")
    sample.add_argument("dir")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--format", choices=("coco", "animl"), default="coco",
                        help="coco: the LILA-style sample (image-level labels, seq_id); animl: written the way the "
                             "Animl web app writes an export (per-box labels, reviewed and unreviewed, empties)")
    sample.add_argument("--behaviours", action="store_true",
                        help="coco: each animal annotation also carries Snapshot Safari-style fields, count and the "
                             "flags standing, resting, moving, eating, interacting, young_present (some missing): "
                             "the outputs of a multi-output model")
    sample.add_argument("--empties-per-location", type=int, default=1, metavar="N",
                        help="coco: empty frames per location (for the empty-or-not model)")
    sample.set_defaults(func=run_sample_export, needs_home=False)
    demo = commands.add_parser("demo", help="sample export -> register -> cct_export, images, md_detections, crops "
                                            "-> classification_dataset, splits -> classifier_checkpoint -> "
                                            "classifier_evaluation -> registered_model -> champion, all under "
                                            "ANIML_HOME")
    demo.add_argument("--challenger", action="store_true", help="after a demo: train a worse model on its data; "
                                                                "the champion gate keeps the champion")
    demo.add_argument("--run-config", metavar="FILE", help="Dagster run config over the demo's own for any of its "
                                                           "steps, e.g. ops: {classifier_checkpoint: {config: "
                                                           "{epochs: 2}}}")
    demo.set_defaults(func=lambda args, settings: run_demo(settings, args.challenger, load_run_config(args.run_config)))
