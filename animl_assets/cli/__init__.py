"""The animl command: make a sample export, register exports, materialize, run the demo, open the UIs, look
after a home. One module per command group; each adds its subcommands, and the parser dispatches to them."""

from __future__ import annotations

import argparse
import os
import sys

from animl_assets.cli import demo, history, jobs, services
from animl_assets.cli.common import CliError, RunCrashed
from animl_assets.cli.home import ensure_dagster_home
from animl_assets.settings import ENV_HELP, HOME_VAR, MLFLOW_QUIET, Settings

COMMAND_GROUPS = (demo, jobs, history, services)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="animl", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=ENV_HELP,
        description="Camera-trap exports to species-classifier datasets, as Dagster assets. Everything a "
                    "command leaves is under ANIML_HOME (default ./.animl).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    for name, value in MLFLOW_QUIET.items():  # no progress bars in CLI logs
        os.environ.setdefault(name, value)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passes_on", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.passed_on = extra
    try:
        settings = Settings.from_env()
        if getattr(args, "needs_home", True):
            if not os.environ.get(HOME_VAR):
                os.environ[HOME_VAR] = str(settings.home)  # one home for this process and the runs it starts
            ensure_dagster_home(settings)
        return args.func(args, settings)
    except (CliError, ValueError, OSError) as err:  # expected: say what is wrong, no traceback
        print(f"animl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunCrashed:
        return 1
    except KeyboardInterrupt:
        print(f"animl {args.command}: stopped", file=sys.stderr)
        return 130


__all__ = ["build_parser", "ensure_dagster_home", "main"]
