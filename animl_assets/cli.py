"""The ``animl`` command: make a sample export, register exports, materialize, run the demo."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from animl_assets.settings import Settings

REPO_DAGSTER_YAML = Path(__file__).resolve().parents[1] / "dagster.yaml"
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def ensure_dagster_home(settings: Settings) -> Path:
    """Point DAGSTER_HOME at ANIML_HOME/dagster unless it is set, with the project's dagster.yaml in it."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(settings.dagster_home)))
    home.mkdir(parents=True, exist_ok=True)
    if REPO_DAGSTER_YAML.is_file() and not (home / "dagster.yaml").exists():
        shutil.copyfile(REPO_DAGSTER_YAML, home / "dagster.yaml")
    return home


def register_export(settings: Settings, path_or_uri: str, images_root: str | None = None) -> str:
    """Put an export into the exports location (if it is not there already) and add its partition."""
    import dagster as dg

    from animl_assets.assets import exports_partitions
    from animl_assets.core.cct import load_cct
    from animl_assets.core.exports import partition_key_for
    from animl_assets.definitions import build_resources
    from animl_assets.resources.storage import read_uri

    exports_resource = build_resources(settings)["exports"]
    exports = exports_resource.store()
    exports_root = exports.uri().rstrip("/") + "/"
    source_uri = path_or_uri if path_or_uri.startswith("s3://") else str(Path(path_or_uri).absolute())
    if source_uri.startswith(exports_root):
        if images_root:
            raise ValueError("--images-root is for exports outside the exports location; for this one set "
                             "ANIML_IMAGES_URI or the images asset's images_root config")
        export_key = source_uri[len(exports_root):]
    else:
        folder, _, name = source_uri.rpartition("/")
        cct = load_cct(read_uri(source_uri, exports_resource.s3))
        if not isinstance(cct.get("info"), dict):
            cct["info"] = {}
        cct["info"]["animl_images_root"] = images_root or folder
        export_key, data = name, json.dumps(cct).encode()
        if exports.exists(export_key) and exports.read_bytes(export_key) != data:
            raise ValueError(f"another export is already registered as {exports.uri(export_key)}: "
                             "rename this one (its file name becomes the partition key)")
        exports.write_bytes(export_key, data)
    partition = partition_key_for(export_key)
    instance = dg.DagsterInstance.get()
    if not instance.has_dynamic_partition(exports_partitions.name, partition):
        instance.add_dynamic_partitions(exports_partitions.name, [partition])
    return partition


def run_job(settings: Settings, job_name: str, partition: str | None = None) -> bool:
    """Run one of the Definitions' jobs (for one partition, if given), printing what it materialized."""
    import dagster as dg

    from animl_assets.definitions import build_definitions

    job = build_definitions(settings).resolve_job_def(job_name)
    result = job.execute_in_process(partition_key=partition, instance=dg.DagsterInstance.get(),
                                    run_config=QUIET_LOGS, raise_on_error=False)
    where = f" [{partition}]" if partition else ""
    for event in result.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            materialization = event.event_specific_data.materialization
            counts = {k: v.value for k, v in materialization.metadata.items()
                      if (k.startswith("num_") or k == "score") and isinstance(v.value, (int, float))}
            print(f"  materialized {materialization.asset_key.to_user_string()}{where}: {counts}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION" and not event.event_specific_data.passed:
            print(f"  check failed: {event.event_specific_data.check_name}")
        elif event.event_type_value == "STEP_FAILURE":
            print(f"  step failed: {event.step_key}: {event.event_specific_data.error.message.strip()}")
    return result.success


def materialize_export(settings: Settings, partition: str) -> bool:
    """Run the per-export job for one partition; True when it succeeded."""
    from animl_assets.definitions import INGEST_JOB

    return run_job(settings, INGEST_JOB, partition)


def run_demo(settings: Settings) -> int:
    """Generate the sample export, register it and materialize every per-export asset."""
    from animl_assets.core.sample import EXPORT_NAME, write_sample_export

    started = time.perf_counter()
    export_dir = Path(settings.exports_uri) / "sample"
    if settings.exports_uri.startswith("s3://"):
        export_dir = settings.home / "sample_export"
    print(f"[1/4] writing the sample export to {export_dir}")
    sample = write_sample_export(export_dir)
    print(f"      {sample.images} images, {sample.annotations} annotations, "
          f"{len(sample.broken_files)} deliberately broken files")
    print("[2/4] registering it as a partition of 'exports'")
    partition = register_export(settings, str(export_dir / EXPORT_NAME))
    print(f"      partition: {partition}")
    print("[3/4] materializing cct_export -> images -> md_detections -> crops")
    ok = materialize_export(settings, partition)
    if ok:
        from animl_assets.definitions import DATASET_JOB

        print("[4/4] materializing classification_dataset -> splits (all exports)")
        ok = run_job(settings, DATASET_JOB)
    print(f"\n{'done' if ok else 'FAILED'} in {time.perf_counter() - started:.1f}s")
    print(f"artifacts:    {settings.storage_uri}")
    print(f"dagster home: {os.environ['DAGSTER_HOME']}")
    print("open the UI:  make ui   (then http://127.0.0.1:3000)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="animl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample-export", help="write the deterministic sample export into DIR")
    sample.add_argument("dir")
    sample.add_argument("--seed", type=int, default=0)
    register = commands.add_parser("register", help="add an export (path or s3:// URI) as a partition")
    register.add_argument("path_or_uri")
    register.add_argument("--images-root", help="folder or s3:// prefix its images are relative to "
                                                "(default: the export's own folder)")
    register.add_argument("--no-run", action="store_true", help="only add the partition")
    materialize = commands.add_parser("materialize", help="materialize the per-export assets of a partition")
    materialize.add_argument("partition")
    commands.add_parser("build-dataset", help="materialize classification_dataset and splits over all exports")
    commands.add_parser("demo", help="sample export -> register -> materialize, all under ANIML_HOME")
    args = parser.parse_args(argv)

    try:
        return _run(args, Settings.from_env())
    except (ValueError, FileNotFoundError) as err:  # bad input: say what is wrong, no traceback
        print(f"animl {args.command}: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "sample-export":
        from animl_assets.core.sample import write_sample_export

        result = write_sample_export(args.dir, seed=args.seed)
        print(f"wrote {result.path}: {result.images} images, {result.annotations} annotations")
        return 0
    ensure_dagster_home(settings)
    if args.command == "demo":
        return run_demo(settings)
    if args.command == "register":
        partition = register_export(settings, args.path_or_uri, args.images_root)
        print(f"registered partition {partition!r}")
        return 0 if args.no_run else (0 if materialize_export(settings, partition) else 1)
    if args.command == "build-dataset":
        from animl_assets.definitions import DATASET_JOB

        return 0 if run_job(settings, DATASET_JOB) else 1
    return 0 if materialize_export(settings, args.partition) else 1


if __name__ == "__main__":
    sys.exit(main())
