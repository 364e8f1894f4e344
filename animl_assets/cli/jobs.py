"""Running the Definitions' jobs from the command line: ``register``, ``materialize``, ``build-dataset``,
``train`` and ``classify``, with one line per message the assets log."""

from __future__ import annotations

import argparse
import inspect
import logging
import sys

from animl_assets.cli.common import REPORTED_ERRORS, CliError, RunCrashed, load_run_config
from animl_assets.registration import register_export
from animl_assets.settings import Settings

CLI_LOGGER = {"loggers": {"animl": {"config": {"log_level": "INFO"}}}}
GATE_CHECK = "beats_champion"


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
    from animl_assets.resources import build_resources
    from animl_assets.runs import process_tags

    job = build_definitions().resolve_job_def(job_name).with_logger_defs({"animl": _cli_logger_def()})
    check_config_bounds(job, run_config or {})
    if "mlflow" in job.required_resource_keys:  # a tracking server that is gone: one line now, not in a step
        build_resources(Settings.from_env())["mlflow"].check_server()
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
                                    "model_version", "champion_version", "queued")) or k == "score")
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
        print(f"  {message}{'' if blocking else ' (warning)'}" + (f": {check.description}" if check.description else ""))
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


def run_for_export(job_name: str, partition: str, run_config: dict | None = None) -> None:
    """Run a per-export job for one registered partition."""
    known = known_partitions()
    if partition not in known:
        raise CliError(f"unknown partition {partition!r}; known: {', '.join(known) or 'none (animl register one)'}")
    run_job(job_name, partition, run_config)


def materialize_export(partition: str, run_config: dict | None = None) -> None:
    """Run the per-export job for one partition."""
    from animl_assets.definitions import INGEST_JOB

    run_for_export(INGEST_JOB, partition, run_config)


def build_dataset(run_config: dict | None = None) -> None:
    """classification_dataset and splits over every export whose crops are materialized."""
    from animl_assets.definitions import DATASET_JOB

    if not known_partitions():
        raise CliError("no exports registered yet: animl register EXPORT (or animl demo) first")
    run_job(DATASET_JOB, None, run_config)


def train(run_config: dict | None = None) -> bool:
    """classifier_checkpoint on the newest dataset version and splits, then its evaluation, registration and
    the champion gate; True when the new version became champion."""
    from animl_assets.definitions import TRAIN_JOB

    return run_job(TRAIN_JOB, None, run_config, outcomes=(GATE_CHECK,))


def classify_export(partition: str, run_config: dict | None = None) -> None:
    """classifications and classified_detections of one export (the champion by default)."""
    from animl_assets.definitions import CLASSIFY_JOB

    run_for_export(CLASSIFY_JOB, partition, run_config)


def train_empty(run_config: dict | None = None) -> bool:
    """Whole frames of every export that has none yet, then the empty-or-not model on them: dataset, splits,
    training, evaluation, registration and the gate; True when the new version became champion."""
    import dagster as dg

    from animl_assets.assets.families import EMPTY
    from animl_assets.definitions import EMPTY_FRAMES_JOB, EMPTY_TRAIN_JOB

    partitions = known_partitions()
    if not partitions:
        raise CliError("no exports registered yet: animl register EXPORT (or animl demo) first")
    done = dg.DagsterInstance.get().get_materialized_partitions(dg.AssetKey(EMPTY.images))
    for partition in sorted(set(partitions) - set(done)):
        run_job(EMPTY_FRAMES_JOB, partition, run_config)
    return run_job(EMPTY_TRAIN_JOB, None, run_config, outcomes=(GATE_CHECK,))


def score_empties(partition: str, run_config: dict | None = None) -> None:
    """empty_frames and empty_scores of one export (the animl-empty champion by default)."""
    from animl_assets.definitions import EMPTY_SCORE_JOB

    run_for_export(EMPTY_SCORE_JOB, partition, run_config)


def _with_run_config(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
    command.add_argument("--run-config", metavar="FILE", help="Dagster run config (YAML or JSON), as in the "
                                                              "launchpad: ops: {cct_export: {config: {…}}}")
    return command


def run_register(args: argparse.Namespace, settings: Settings) -> int:
    partition = register_export(settings, args.path_or_uri, args.images_root, args.name)
    print(f"registered partition {partition!r}")
    if not args.no_run:
        materialize_export(partition, load_run_config(args.run_config))
    return 0


def run_materialize(args: argparse.Namespace, _settings: Settings) -> int:
    materialize_export(args.partition, load_run_config(args.run_config))
    return 0


def run_build_dataset(args: argparse.Namespace, _settings: Settings) -> int:
    build_dataset(load_run_config(args.run_config))
    return 0


def run_train(args: argparse.Namespace, _settings: Settings) -> int:
    train(load_run_config(args.run_config))  # a new version the gate keeps as challenger is an outcome too
    return 0


def run_classify(args: argparse.Namespace, _settings: Settings) -> int:
    classify_export(args.partition, load_run_config(args.run_config))
    return 0


def run_train_empty(args: argparse.Namespace, _settings: Settings) -> int:
    train_empty(load_run_config(args.run_config))
    return 0


def run_score_empties(args: argparse.Namespace, _settings: Settings) -> int:
    score_empties(args.partition, load_run_config(args.run_config))
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """``register``, ``materialize``, ``build-dataset``, ``train``, ``classify``, ``train-empty`` and
    ``score-empties``."""
    register = _with_run_config(commands.add_parser(
        "register", help="add an export (path or s3:// URI) as a partition and ingest it",
        description="Add an export as a partition of 'exports' and ingest it. An export outside the exports "
                    "location is copied into it, with <export>.md.json (MegaDetector results) when one lies "
                    "beside it; its images stay where they are."))
    register.add_argument("path_or_uri")
    register.add_argument("--name", help="the partition key (default: the file name without .json); "
                                         "letters, digits, '.', '_', '-' and '/'")
    register.add_argument("--images-root", help="folder or s3:// prefix its images are relative to "
                                                "(default: the export's own folder)")
    register.add_argument("--no-run", action="store_true", help="only add the partition")
    register.set_defaults(func=run_register)
    materialize = _with_run_config(commands.add_parser("materialize", help="re-run the per-export assets of a "
                                                                           "partition"))
    materialize.add_argument("partition")
    materialize.set_defaults(func=run_materialize)
    build = _with_run_config(commands.add_parser("build-dataset", help="materialize classification_dataset and "
                                                                       "splits over all exports"))
    build.set_defaults(func=run_build_dataset)
    training = _with_run_config(commands.add_parser(
        "train", help="materialize classifier_checkpoint on the newest dataset and splits (config: ops: "
                      "{classifier_checkpoint: {config: {…}}})"))
    training.set_defaults(func=run_train)
    classify = _with_run_config(commands.add_parser(
        "classify", help="classify a partition's crops with the champion and write its MegaDetector JSON with "
                         "classifications (for Timelapse)"))
    classify.add_argument("partition")
    classify.set_defaults(func=run_classify)
    empty = _with_run_config(commands.add_parser(
        "train-empty", help="the empty-or-not model on whole frames of every export: frames, dataset, splits, "
                            "training, evaluation, registration as animl-empty and its gate"))
    empty.set_defaults(func=run_train_empty)
    scores = _with_run_config(commands.add_parser(
        "score-empties", help="score a partition's images empty or not with the animl-empty champion, before any "
                              "detection (empty_scores.csv: set aside, or ranked for review)"))
    scores.add_argument("partition")
    scores.set_defaults(func=run_score_empties)
