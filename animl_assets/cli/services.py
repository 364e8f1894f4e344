"""``animl ui`` and ``animl mlflow-ui``: the Dagster and MLflow UIs on this home's stores."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from animl_assets.cli.common import REPO
from animl_assets.settings import DAGSTER_HOME_VAR, Settings


def run_mlflow_ui(settings: Settings, extra_args: list[str]) -> int:
    """The MLflow UI on the tracking store (MLFLOW_TRACKING_URI, else the embedded SQLite store)."""
    from animl_assets.core.paths import redact_credentials
    from animl_assets.resources import build_resources

    tracking = build_resources(settings)["mlflow"]  # the same store and artifact root the assets use
    uri, artifact_root = tracking.uri, tracking.artifact_root
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow) if mlflow.exists() else "mlflow", "ui", "--backend-store-uri", uri,
               *(["--default-artifact-root", artifact_root] if artifact_root else []), *extra_args]
    print(f"MLflow UI on {redact_credentials(uri)}: http://127.0.0.1:5000 (unless --port says otherwise)")
    return subprocess.call(command)


def run_ui(extra_args: list[str]) -> int:
    """``dagster dev`` (webserver and daemon) on the project, run from DAGSTER_HOME so the instance there is
    the one used and no other dagster.yaml is picked up."""
    workspace = REPO / "workspace.yaml"
    target = ["-w", str(workspace)] if workspace.is_file() else ["-m", "animl_assets.definitions"]
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster) if dagster.exists() else "dagster", "dev", *target, *extra_args]
    return run_forwarding_signals(command, cwd=os.environ[DAGSTER_HOME_VAR])


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


def add_commands(commands: argparse._SubParsersAction) -> None:
    """``ui`` and ``mlflow-ui``; the arguments after them go to ``dagster dev`` and ``mlflow ui``."""
    ui = commands.add_parser("ui", help="the Dagster UI and daemon (sensors) on http://127.0.0.1:3000; "
                                        "arguments after it go to dagster dev (e.g. --port 3001)")
    ui.set_defaults(func=lambda args, _settings: run_ui(args.passed_on), passes_on=True)
    mlflow_ui = commands.add_parser("mlflow-ui", help="the MLflow UI on the tracking store (embedded: "
                                                      "$ANIML_HOME/mlflow.db); arguments after it go to mlflow ui "
                                                      "(e.g. --port 5001)")
    mlflow_ui.set_defaults(func=lambda args, settings: run_mlflow_ui(settings, args.passed_on), passes_on=True)
