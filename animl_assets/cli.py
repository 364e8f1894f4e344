"""The animl command: make a sample export, register exports, materialize, run the demo, open the UI."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from animl_assets.core.files import init_lock
from animl_assets.settings import ENV_HELP, Settings

REPO = Path(__file__).resolve().parents[1]
REPO_DAGSTER_YAML = REPO / "dagster.yaml"
CLI_LOGGER = {"loggers": {"animl": {"config": {"log_level": "INFO"}}}}


class CliError(Exception):
    """An expected failure: bad input or a run that stopped for a reason it reported. One line, exit 2."""


# what a step raises that says itself what is wrong: one line, no trace (a Failure, a service that cannot be asked)
REPORTED_ERRORS = ("Failure", "RegistryUnavailable", "TrackingUnavailable")


class RunCrashed(Exception):
    """A run failed on an unexpected error, whose trace has been printed. Exit 1."""


def ensure_dagster_home(settings: Settings) -> Path:
    """The Dagster instance folder, set up once: DAGSTER_HOME when it is set (and not empty), else
    ANIML_HOME/dagster, where ``dagster.yaml`` is a link to the repository's, so edits there always apply
    (an older copy that differs is left alone, with a warning). A DAGSTER_HOME of the user's own gets a
    copy of the project's dagster.yaml only when it has none. The first command to use a home creates its
    databases under a file lock, so commands started together never migrate them twice.
    """
    if os.environ.get("DAGSTER_HOME"):
        home, managed = Path(os.environ["DAGSTER_HOME"]), False
    else:
        home, managed = settings.dagster_home, True
        os.environ["DAGSTER_HOME"] = str(home)
    with init_lock(home):
        _link_dagster_yaml(home / "dagster.yaml", managed)
        _create_instance_storage()
    return home


def _link_dagster_yaml(target: Path, managed: bool) -> None:
    if not REPO_DAGSTER_YAML.is_file():
        return
    if not target.exists() and not target.is_symlink():
        if managed:
            target.symlink_to(REPO_DAGSTER_YAML)
        else:
            target.write_bytes(REPO_DAGSTER_YAML.read_bytes())
    elif managed and not target.is_symlink():
        if target.read_bytes() == REPO_DAGSTER_YAML.read_bytes():
            target.unlink()
            target.symlink_to(REPO_DAGSTER_YAML)
        else:
            print(f"animl: warning: {target} is an edited copy; {REPO_DAGSTER_YAML} is not used "
                  "(remove the copy to use it)", file=sys.stderr)


def _create_instance_storage() -> None:
    """Open the instance once: its SQLite run, event and schedule databases are created and migrated."""
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        instance.get_runs(limit=1)
        instance.get_dynamic_partitions("exports")


def register_export(settings: Settings, path_or_uri: str, images_root: str | None = None,
                    name: str | None = None) -> str:
    """Put an export into the exports location (if it is not there already), with the MegaDetector results
    lying beside it (``<export>.md.json``), and add its partition. Returns the partition key."""
    import dagster as dg

    from animl_assets.assets import exports_partitions
    from animl_assets.core.cct import load_cct
    from animl_assets.core.exports import export_key_for, mdcache_key_for, partition_key_for
    from animl_assets.definitions import build_resources
    from animl_assets.resources.storage import read_uri

    exports_resource = build_resources(settings)["exports"]
    exports = exports_resource.store()
    exports_root = exports.uri().rstrip("/") + "/"
    source_uri = path_or_uri if path_or_uri.startswith("s3://") else str(Path(path_or_uri).expanduser().absolute())
    if source_uri.startswith(exports_root):
        if images_root or name:
            raise CliError(f"--images-root and --name are for exports outside the exports location; this one "
                           f"is its partition {partition_key_for(source_uri[len(exports_root):])!r} already "
                           "(set ANIML_IMAGES_URI or the images asset's images_root config instead)")
        export_key = source_uri[len(exports_root):]
        partition = partition_key_for(export_key)
    else:
        folder, _, file_name = source_uri.rpartition("/")
        partition = partition_key_for(f"{name}.json" if name else file_name)
        export_key = export_key_for(partition)
        cct = load_cct(read_uri(source_uri, exports_resource.s3))
        if not isinstance(cct.get("info"), dict):
            cct["info"] = {}
        root = images_root or folder
        cct["info"]["animl_images_root"] = root
        copies = {export_key: json.dumps(cct).encode()}
        try:
            copies[mdcache_key_for(export_key)] = read_uri(mdcache_key_for(source_uri), exports_resource.s3)
        except FileNotFoundError:
            pass
        for key, data in copies.items():
            if exports.exists(key) and exports.read_bytes(key) != data:
                raise CliError(f"another export is already registered as {exports.uri(key)}: "
                               "choose another partition key with --name NAME")
        for key, data in copies.items():
            exports.write_bytes(key, data)
        trust_images_root(settings, root)
        if len(copies) > 1:
            print(f"with the MegaDetector results beside it: {mdcache_key_for(source_uri)}")
    instance = dg.DagsterInstance.get()
    if not instance.has_dynamic_partition(exports_partitions.name, partition):
        instance.add_dynamic_partitions(exports_partitions.name, [partition])
    return partition


def trust_images_root(settings: Settings, root: str) -> None:
    """Record ``root`` as a place exports may read images from: the operator named it (see ImageSource)."""
    from animl_assets.resources.storage import REGISTERED_ROOTS

    path = settings.home / REGISTERED_ROOTS
    path.parent.mkdir(parents=True, exist_ok=True)
    if root not in (path.read_text().splitlines() if path.is_file() else []):
        with path.open("a") as handle:
            handle.write(root + "\n")


class _CompactFormatter(logging.Formatter):
    """What a run logs, one line each: the assets' own messages; Dagster's events are summed up after."""

    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, "dagster_meta", {})
        level = "" if record.levelno < logging.WARNING else record.levelname.lower() + ": "
        return f"  {meta.get('step_key') or 'run'}: {level}{meta.get('orig_message', record.getMessage())}"


class _UserMessagesOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        meta = getattr(record, "dagster_meta", {})
        skipped_step = str(meta.get("orig_message", "")).startswith("Dependencies for step")
        return meta.get("dagster_event") is None and not skipped_step


def _cli_logger_def():
    import dagster as dg

    @dg.logger(config_schema={"log_level": dg.Field(str, default_value="INFO")},
               description="One line per message the assets log; Dagster's own events are left out.")
    def cli_logger(init_context) -> logging.Logger:
        logger = logging.Logger("animl", init_context.logger_config["log_level"])
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_CompactFormatter())
        handler.addFilter(_UserMessagesOnly())
        logger.addHandler(handler)
        return logger

    return cli_logger


def load_run_config(path: str | None) -> dict:
    """Dagster run config from a YAML or JSON file (``ops: {asset: {config: {…}}}``), or {} without one."""
    if not path:
        return {}
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise CliError(f"run config {path} is not valid YAML or JSON: {err}") from err
    if not isinstance(config, dict):
        raise CliError(f"run config {path} must be a mapping such as ops: {{images: {{config: {{…}}}}}}")
    return config


def check_config_bounds(job, run_config: dict) -> None:
    """Build each op's config class from ``run_config`` before the run starts, so a value out of its bounds
    (epochs 0, a negative learning rate) is one CliError line naming the field, not a step's traceback."""
    import pydantic

    problems = []
    for name, op in (run_config.get("ops") or {}).items():
        if not job.graph.has_node_named(name) or not isinstance(op, dict) or not isinstance(op.get("config"), dict):
            continue
        compute = getattr(job.graph.node_named(name).definition, "compute_fn", None)
        parameter = inspect.signature(compute.decorated_fn).parameters.get("config") if compute else None
        config_class = parameter.annotation if parameter else None
        if not (isinstance(config_class, type) and issubclass(config_class, pydantic.BaseModel)):
            continue
        try:
            config_class(**op["config"])
        except pydantic.ValidationError as err:
            problems += [f"{name}.{'.'.join(map(str, e['loc']))}: {e['msg'].lower()} (got {e.get('input')!r})"
                         for e in err.errors()]
    if problems:
        raise CliError(f"invalid run config: {'; '.join(problems)}")


def _wait_for_pools(instance, job) -> None:
    """End the runs whose process died (they would hold their pool slots for ever), then wait here, where
    Ctrl-C works, until the pools this job's steps need have a free slot."""
    from animl_assets.runs import wait_for_pools

    pools = sorted({pool for node in job.graph.nodes if (pool := getattr(node.definition, "pool", None))})
    waited = wait_for_pools(instance, pools, lambda line: print(f"  {line}", flush=True))
    if waited >= 1:
        print(f"  the {', '.join(pools)} pool is free after {waited:.0f} s: starting", flush=True)


def run_job(job_name: str, partition: str | None = None, run_config: dict | None = None,
            outcomes: tuple[str, ...] = ()) -> bool:
    """Run one of the Definitions' jobs (for one partition, if given), printing what it materialized.

    A step stopped by a reported failure (``dg.Failure``) or a failed blocking check raises CliError
    naming it; an unexpected error prints its trace and raises RunCrashed. A failed check named in
    ``outcomes`` (a gate: the champion stays) is an outcome, not an error: printed, and False returned.
    """
    import dagster as dg

    from animl_assets.definitions import build_definitions
    from animl_assets.runs import process_tags

    job = build_definitions().resolve_job_def(job_name).with_logger_defs({"animl": _cli_logger_def()})
    check_config_bounds(job, run_config or {})
    instance = dg.DagsterInstance.get()
    _wait_for_pools(instance, job)
    try:
        result = job.execute_in_process(partition_key=partition, instance=instance, tags=process_tags(),
                                        run_config={**(run_config or {}), **CLI_LOGGER}, raise_on_error=False)
    except dg.DagsterInvalidConfigError as err:
        raise CliError(f"invalid run config: {'; '.join(e.message for e in err.errors)}") from err
    where = f" [{partition}]" if partition else ""
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        counts = {k: v.value for k, v in materialization.metadata.items()
                  if (k.startswith(("num_", "val_acc_top1", "test_acc_top1", "test_macro_recall", "best_epoch",
                                    "model_version", "champion_version")) or k == "score")
                  and isinstance(v.value, (int, float))}
        print(f"  materialized {materialization.asset_key.to_user_string()}{where}: {counts}")
    expected, unexpected, gated = [], [], False
    for check in result.get_asset_check_evaluations():
        if check.passed:
            continue
        if check.check_name in outcomes:
            gated = True
            reason = check.metadata.get("reason")
            print(f"  check {check.check_name}: {reason.value if reason else 'failed'}")
            continue
        blocking = check.blocking and check.severity == dg.AssetCheckSeverity.ERROR
        problems = check.metadata.get("problems")
        message = f"check {check.check_name} on {check.asset_key.to_user_string()} failed" + (
            f" ({problems.value} problems)" if problems and isinstance(problems.value, int) else "")
        print(f"  {message}{'' if blocking else ' (warning)'}")
        if blocking:
            expected.append(message)
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        if error.cls_name == "DagsterAssetCheckFailedError":
            continue  # the failed check itself is reported above
        user = event.step_failure_data.user_failure_data
        trace = user.metadata.get("traceback") if user and user.metadata else None
        if trace is not None:  # a bug stopped without retries (retry_only_transient): still a crash, with its trace
            unexpected.append(f"step {event.step_key} failed: {user.description}\n{trace.value}")
            continue
        failure = error if error.cls_name in REPORTED_ERRORS else error.cause
        if failure is not None and failure.cls_name in REPORTED_ERRORS:
            expected.append(f"{event.step_key}: {failure.message.split(': ', 1)[-1].strip()}")
        else:
            unexpected.append(f"step {event.step_key} failed:\n{error.to_string()}")
    if unexpected:
        print("\n".join(unexpected), file=sys.stderr)
        raise RunCrashed(job_name)
    if expected or not (result.success or gated):
        raise CliError("; ".join(expected) or f"the run of {job_name}{where} failed")
    return not gated


def known_partitions() -> list[str]:
    import dagster as dg

    from animl_assets.assets import exports_partitions

    return sorted(dg.DagsterInstance.get().get_dynamic_partitions(exports_partitions.name))


def materialize_export(partition: str, run_config: dict | None = None) -> None:
    """Run the per-export job for one partition."""
    from animl_assets.definitions import INGEST_JOB

    known = known_partitions()
    if partition not in known:
        raise CliError(f"unknown partition {partition!r}; known: {', '.join(known) or 'none (animl register one)'}")
    run_job(INGEST_JOB, partition, run_config)


def build_dataset(run_config: dict | None = None) -> None:
    """classification_dataset and splits over every export whose crops are materialized."""
    from animl_assets.definitions import DATASET_JOB

    if not known_partitions():
        raise CliError("no exports registered yet: animl register EXPORT (or animl demo) first")
    run_job(DATASET_JOB, None, run_config)


DEMO_IMAGES_PER_CLASS_AND_LOCATION = 4  # about 200 crops: enough for train, val and test to mean something
# Small enough for a 2-core laptop in well under a minute: Lite0's packaged ImageNet weights (offline), the head
# fine-tuned at 128 px.
DEMO_TRAINING = {"model_name": "efficientnet-lite0", "pretrained": "lite0", "image_size": 128, "epochs": 10,
                 "finetune": 10, "batch_size": 16, "lr": 0.001, "num_workers": 2, "progress_every": 0}
# `animl demo --challenger`: a deliberately worse config (no pretrained weights, two epochs, no label
# weighting), to watch the champion gate keep the champion.
DEMO_CHALLENGER = DEMO_TRAINING | {"pretrained": "false", "epochs": 2, "finetune": 0, "label_weighted": False}
GATE_CHECK = "beats_champion"


def train(run_config: dict | None = None) -> bool:
    """classifier_checkpoint on the newest dataset version and splits, then its evaluation, registration and
    the champion gate; True when the new version became champion."""
    from animl_assets.definitions import TRAIN_JOB

    return run_job(TRAIN_JOB, None, run_config, outcomes=(GATE_CHECK,))


def classify_export(partition: str, run_config: dict | None = None) -> None:
    """classifications and classified_detections of one export (the champion by default)."""
    from animl_assets.definitions import CLASSIFY_JOB

    known = known_partitions()
    if partition not in known:
        raise CliError(f"unknown partition {partition!r}; known: {', '.join(known) or 'none (animl register one)'}")
    run_job(CLASSIFY_JOB, partition, run_config)


def _registry_line(settings: Settings) -> str:
    from animl_assets.core import registry
    from animl_assets.definitions import build_resources

    client = build_resources(settings)["mlflow"].connect()
    aliases = {alias: registry.by_alias(client, registry.DEFAULT_MODEL, alias)
               for alias in (registry.CHAMPION, registry.CHALLENGER)}
    found = ", ".join(f"{alias} = version {v.version}" for alias, v in aliases.items() if v)
    return f"{registry.DEFAULT_MODEL}: {found or 'no versions'}"


def run_mlflow_ui(settings: Settings, extra_args: list[str]) -> int:
    """The MLflow UI on the tracking store (MLFLOW_TRACKING_URI, else the embedded SQLite store)."""
    from animl_assets.core.paths import redact_credentials
    from animl_assets.definitions import build_resources

    tracking = build_resources(settings)["mlflow"]  # the same store and artifact root the assets use
    uri, artifact_root = tracking.uri, tracking.artifact_root
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow) if mlflow.exists() else "mlflow", "ui", "--backend-store-uri", uri,
               *(["--default-artifact-root", artifact_root] if artifact_root else []), *extra_args]
    print(f"MLflow UI on {redact_credentials(uri)}: http://127.0.0.1:5000 (unless --port says otherwise)")
    return subprocess.call(command)


def run_demo(settings: Settings, challenger: bool = False) -> int:
    """Generate the sample export, register it and materialize every asset up to a champion model; with
    ``challenger``, train a worse model on the same data and let the gate keep the champion."""
    from animl_assets.core.exports import partition_folder
    from animl_assets.core.sample import EXPORT_NAME, write_sample_export

    started = time.perf_counter()
    if challenger:
        if not known_partitions():
            raise CliError("run animl demo first: --challenger trains on its dataset")
        print("[1/1] training a deliberately worse model (no pretrained weights, 2 epochs) -> evaluation -> "
              "registry -> champion gate")
        promoted = train({"ops": {"classifier_checkpoint": {"config": DEMO_CHALLENGER}}})
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
    materialize_export(partition)
    print("[4/6] materializing classification_dataset -> splits (all exports)")
    build_dataset()
    print(f"[5/6] classifier_checkpoint ({DEMO_TRAINING['model_name']}, MLflow run) -> classifier_evaluation -> "
          "registered_model -> beats_champion -> champion_model")
    train({"ops": {"classifier_checkpoint": {"config": DEMO_TRAINING}}})
    print("[6/6] classifying the export with the champion: classifications -> classified_detections "
          "(MegaDetector JSON for Timelapse)")
    classify_export(partition, {"ops": {"classified_detections": {"config": {"label_pos": "last"}}}})
    print(f"\ndone in {time.perf_counter() - started:.1f}s")
    print(f"artifacts:    {settings.storage_uri}")
    print(f"dagster home: {os.environ['DAGSTER_HOME']}")
    print(f"registry:     {_registry_line(settings)}")
    print(f"for Timelapse: {settings.storage_uri.rstrip('/')}/classified_detections/{partition_folder(partition)}/"
          "classified_detections.json")
    print("open the UI:  make ui   (then http://127.0.0.1:3000); MLflow: animl mlflow-ui")
    print("next:         animl demo --challenger   (a worse model: the gate keeps the champion)")
    return 0


def run_ui(extra_args: list[str]) -> int:
    """``dagster dev`` (webserver and daemon) on the project, run from DAGSTER_HOME so the instance there is
    the one used and no other dagster.yaml is picked up."""
    workspace = REPO / "workspace.yaml"
    target = ["-w", str(workspace)] if workspace.is_file() else ["-m", "animl_assets.definitions"]
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster) if dagster.exists() else "dagster", "dev", *target, *extra_args]
    return run_forwarding_signals(command, cwd=os.environ["DAGSTER_HOME"])


def run_forwarding_signals(command: list[str], cwd: str) -> int:
    """Run ``command`` and hand it the SIGTERM or SIGHUP this process gets (a service manager, ``kill``), so
    stopping ``animl ui`` stops ``dagster dev`` and its webserver and daemon too; Ctrl-C reaches the child
    from the terminal already, and this process waits for it to finish stopping."""
    import signal

    process = subprocess.Popen(command, cwd=cwd)
    forward = lambda signum, _frame: process.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_lineage(args: argparse.Namespace, settings: Settings) -> int:
    """Print the lineage of a cross-export asset version, as indented lines or JSON."""
    import dagster as dg

    from animl_assets.lineage import lineage

    with dg.DagsterInstance.get() as instance:
        node = lineage(instance, args.asset, args.version)
    print(json.dumps(node.as_dict(), indent=1) if args.json else "\n".join(node.lines()))
    return 0


def run_gc(args: argparse.Namespace, settings: Settings) -> int:
    """List (or with --yes remove) the cross-export versions ``animl gc`` may collect."""
    import dagster as dg

    from animl_assets.definitions import build_resources
    from animl_assets.core.artifact_files import INDEX
    from animl_assets.core.registry import kept_versions
    from animl_assets.lineage import collectable, leased, remove_version
    from animl_assets.resources.io_manager import version_folder
    from animl_assets.runs import end_dead_runs

    resources = build_resources(settings)
    store = resources["storage"].store()
    registered = kept_versions(resources["mlflow"].connect())
    with dg.DagsterInstance.get() as instance:
        for line in end_dead_runs(instance):
            print(line)
        in_use = {asset: set(registered.get(asset, ())) | versions for asset, versions in leased(instance).items()}
        doomed = collectable(instance, args.keep,
                             lambda asset, version: store.exists(f"{version_folder(asset, version)}/{INDEX}"), in_use)
    for asset, versions in doomed.items():
        for version in versions:
            if args.yes:
                print(f"removed {asset} {version} ({remove_version(store, asset, version)} files)")
            else:
                print(f"would remove {asset} {version}")
    if not any(doomed.values()):
        print(f"nothing to remove: every version is among the newest {args.keep}, needed by one, behind a "
              "registered model, or read by a run in progress")
    elif not args.yes:
        print("dry run: run again with --yes to remove them")
    return 0


def run_orphans(args: argparse.Namespace, settings: Settings) -> int:
    """List (with --end, end as KILLED) the MLflow runs left RUNNING by Dagster runs that are over: killed,
    crashed or lost. A resumed training continues its own MLflow run whatever its state."""
    import dagster as dg

    from animl_assets.core.tracking import DAGSTER_RUN_TAG, unfinished_runs
    from animl_assets.definitions import build_resources
    from animl_assets.runs import end_dead_runs, in_progress

    client = build_resources(settings)["mlflow"].connect()
    with dg.DagsterInstance.get() as instance:
        for line in end_dead_runs(instance):
            print(line)
        orphans = [run for run in unfinished_runs(client)
                   if not in_progress(instance, run.data.tags.get(DAGSTER_RUN_TAG))]
    for run in orphans:
        if args.end:
            client.set_terminated(run.info.run_id, status="KILLED")
        dagster_run = (run.data.tags.get(DAGSTER_RUN_TAG) or "none")[:8]
        print(f"{'ended' if args.end else 'orphan'} MLflow run {run.info.run_id} ({run.info.run_name}; Dagster run "
              f"{dagster_run} is over)")
    if not orphans:
        print("no orphan MLflow runs: every RUNNING run belongs to a Dagster run in progress")
    elif not args.end:
        print("run again with --end to mark them KILLED")
    return 0


def run_promote(args: argparse.Namespace, settings: Settings) -> int:
    """Point the registered model's ``champion`` alias at a version by hand, bypassing the gate; recorded as
    version tags and as a ``champion_model`` materialization in the Dagster instance."""
    import dagster as dg

    from animl_assets.core import registry
    from animl_assets.definitions import build_resources

    model, ref = registry.parse_ref(args.model or registry.DEFAULT_MODEL, args.version)
    if args.model and model != args.model:
        raise CliError(f"{args.version} is a version of {model!r}, not of --model {args.model!r}")
    from animl_assets.runs import end_dead_runs, in_progress

    client = build_resources(settings)["mlflow"].connect()
    with dg.DagsterInstance.get() as instance:
        end_dead_runs(instance)
        for line in registry.repair(client, model, lambda v: not in_progress(instance, v.tags.get(
                registry.DAGSTER_RUN_TAG))):
            print(f"{model}: {line}")
    version = registry.resolve(client, model, ref)
    previous = registry.promote(client, version.name, version.version, how="hand", reason=args.reason or "")
    with dg.DagsterInstance.get() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(
            "champion_model", description=f"promoted by hand: {args.reason or 'no reason given'}",
            metadata={"model_name": version.name, "champion_version": int(version.version),
                      "replaced_version": previous or "", "how": "hand"}))
    print(f"{version.name} version {version.version} is champion (was: {previous or 'none'}); recorded as "
          "tag animl.promoted=hand")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from animl_assets.lineage import CROSS_EXPORT

    parser = argparse.ArgumentParser(
        prog="animl", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=ENV_HELP,
        description="Camera-trap exports to species-classifier datasets, as Dagster assets. Everything a "
                    "command leaves is under ANIML_HOME (default ./.animl).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sample = commands.add_parser("sample-export", help="write the deterministic sample export into DIR")
    sample.add_argument("dir")
    sample.add_argument("--seed", type=int, default=0)
    register = commands.add_parser(
        "register", help="add an export (path or s3:// URI) as a partition and ingest it",
        description="Add an export as a partition of 'exports' and ingest it. An export outside the exports "
                    "location is copied into it, with <export>.md.json (MegaDetector results) when one lies "
                    "beside it; its images stay where they are.")
    register.add_argument("path_or_uri")
    register.add_argument("--name", help="the partition key (default: the file name without .json); "
                                         "letters, digits, '.', '_', '-' and '/'")
    register.add_argument("--images-root", help="folder or s3:// prefix its images are relative to "
                                                "(default: the export's own folder)")
    register.add_argument("--no-run", action="store_true", help="only add the partition")
    materialize = commands.add_parser("materialize", help="re-run the per-export assets of a partition")
    materialize.add_argument("partition")
    build = commands.add_parser("build-dataset", help="materialize classification_dataset and splits over all exports")
    training = commands.add_parser("train", help="materialize classifier_checkpoint on the newest dataset and "
                                                 "splits (config: ops: {classifier_checkpoint: {config: {…}}})")
    classify = commands.add_parser("classify", help="classify a partition's crops with the champion and write its "
                                                    "MegaDetector JSON with classifications (for Timelapse)")
    classify.add_argument("partition")
    for command in (register, materialize, build, training, classify):
        command.add_argument("--run-config", metavar="FILE", help="Dagster run config (YAML or JSON), as in the "
                                                                  "launchpad: ops: {cct_export: {config: {…}}}")
    demo = commands.add_parser("demo", help="sample export -> register -> cct_export, images, md_detections, crops "
                                            "-> classification_dataset, splits -> classifier_checkpoint -> "
                                            "classifier_evaluation -> registered_model -> champion, all under ANIML_HOME")
    demo.add_argument("--challenger", action="store_true", help="after a demo: train a worse model on its data; "
                                                                "the champion gate keeps the champion")
    lineage = commands.add_parser("lineage", help="the chain from a dataset, splits or checkpoint version down to the "
                                                  "export partitions and their file hashes")
    lineage.add_argument("asset", choices=list(CROSS_EXPORT))
    lineage.add_argument("--version", help="the version (default: the newest)")
    lineage.add_argument("--json", action="store_true", help="print JSON")
    gc = commands.add_parser("gc", help="remove dataset, splits, checkpoint, evaluation and review-list versions beyond "
                                        "the newest N that nothing kept (nor a registered model) depends on (a dry run "
                                        "unless --yes)")
    promote = commands.add_parser("promote", help="make VERSION (number or alias) of the registered model the "
                                                  "champion by hand, bypassing the gate (recorded as tags)")
    promote.add_argument("version")
    promote.add_argument("--model", help="the registered model (default: the one a models:/ URI names, else "
                                          "animl-classifier)")
    promote.add_argument("--reason", help="why, kept as the version's animl.promotion_reason tag")
    gc.add_argument("--keep", type=int, default=3, help="versions to keep per asset (default 3)")
    gc.add_argument("--yes", action="store_true", help="delete them (default: only list them)")
    orphans = commands.add_parser("orphans", help="list the MLflow runs left RUNNING by Dagster runs that are over "
                                                   "(killed, crashed); --end marks them KILLED")
    orphans.add_argument("--end", action="store_true", help="end them (default: only list them)")
    ui = commands.add_parser("ui", help="the Dagster UI and daemon (sensors) on http://127.0.0.1:3000; "
                                        "arguments after it go to dagster dev (e.g. --port 3001)")
    ui.set_defaults(dagster_args=[])
    commands.add_parser("mlflow-ui", help="the MLflow UI on the tracking store (embedded: $ANIML_HOME/mlflow.db); "
                                          "arguments after it go to mlflow ui (e.g. --port 5001)")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in CLI logs
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("ui", "mlflow-ui"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.dagster_args = extra
    try:
        return _run(args, Settings.from_env())
    except (CliError, ValueError, OSError) as err:  # expected: say what is wrong, no traceback
        print(f"animl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunCrashed:
        return 1
    except KeyboardInterrupt:
        print(f"animl {args.command}: stopped", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "sample-export":
        from animl_assets.core.sample import write_sample_export

        result = write_sample_export(args.dir, seed=args.seed)
        print(f"wrote {result.path}: {result.images} images, {result.annotations} annotations")
        return 0
    if not os.environ.get("ANIML_HOME"):
        os.environ["ANIML_HOME"] = str(settings.home)  # one home for this process and the runs it starts
    ensure_dagster_home(settings)
    if args.command == "demo":
        return run_demo(settings, args.challenger)
    if args.command == "ui":
        return run_ui(args.dagster_args)
    if args.command == "mlflow-ui":
        return run_mlflow_ui(settings, args.dagster_args)
    if args.command == "promote":
        return run_promote(args, settings)
    if args.command == "orphans":
        return run_orphans(args, settings)
    if args.command in ("lineage", "gc"):
        return run_lineage(args, settings) if args.command == "lineage" else run_gc(args, settings)
    if args.command == "register":
        partition = register_export(settings, args.path_or_uri, args.images_root, args.name)
        print(f"registered partition {partition!r}")
        if not args.no_run:
            materialize_export(partition, load_run_config(args.run_config))
    elif args.command == "build-dataset":
        build_dataset(load_run_config(args.run_config))
    elif args.command == "train":
        train(load_run_config(args.run_config))
    elif args.command == "classify":
        classify_export(args.partition, load_run_config(args.run_config))
    else:
        materialize_export(args.partition, load_run_config(args.run_config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
