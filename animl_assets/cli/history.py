"""``animl lineage``, ``animl gc``, ``animl orphans`` and ``animl promote``: what a home holds, what it may
let go, and the registry by hand."""

from __future__ import annotations

import argparse
import json

from animl_assets.cli.common import CliError
from animl_assets.settings import Settings


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

    from animl_assets.core.artifact_files import INDEX
    from animl_assets.core.layout import version_folder
    from animl_assets.core.registry.registry import kept_versions
    from animl_assets.resources import build_resources
    from animl_assets.lineage import collectable, leased, remove_version
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

    from animl_assets.core.registry.tracking import DAGSTER_RUN_TAG, unfinished_runs
    from animl_assets.resources import build_resources
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

    from animl_assets.core.registry import registry
    from animl_assets.resources import build_resources

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


def add_commands(commands: argparse._SubParsersAction) -> None:
    """``lineage``, ``gc``, ``orphans`` and ``promote``."""
    from animl_assets.lineage import CROSS_EXPORT

    lineage = commands.add_parser("lineage", help="the chain from a dataset, splits or checkpoint version down to "
                                                  "the export partitions and their file hashes")
    lineage.add_argument("asset", choices=list(CROSS_EXPORT))
    lineage.add_argument("--version", help="the version (default: the newest)")
    lineage.add_argument("--json", action="store_true", help="print JSON")
    lineage.set_defaults(func=run_lineage)
    gc = commands.add_parser("gc", help="remove dataset, splits, checkpoint, evaluation and review-list versions "
                                        "beyond the newest N that nothing kept (nor a registered model) depends on "
                                        "(a dry run unless --yes)")
    gc.add_argument("--keep", type=int, default=3, help="versions to keep per asset (default 3)")
    gc.add_argument("--yes", action="store_true", help="delete them (default: only list them)")
    gc.set_defaults(func=run_gc)
    promote = commands.add_parser("promote", help="make VERSION (number or alias) of the registered model the "
                                                  "champion by hand, bypassing the gate (recorded as tags)")
    promote.add_argument("version")
    promote.add_argument("--model", help="the registered model (default: the one a models:/ URI names, else "
                                          "animl-classifier)")
    promote.add_argument("--reason", help="why, kept as the version's animl.promotion_reason tag")
    promote.set_defaults(func=run_promote)
    orphans = commands.add_parser("orphans", help="list the MLflow runs left RUNNING by Dagster runs that are over "
                                                   "(killed, crashed); --end marks them KILLED")
    orphans.add_argument("--end", action="store_true", help="end them (default: only list them)")
    orphans.set_defaults(func=run_orphans)
