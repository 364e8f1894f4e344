"""What every command shares: its errors and the run-config file."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REPO_DAGSTER_YAML = REPO / "dagster.yaml"


class CliError(Exception):
    """An expected failure: bad input or a run that stopped for a reason it reported. One line, exit 2."""


# what a step raises that says itself what is wrong: one line, no trace (a Failure, a service that cannot be asked)
REPORTED_ERRORS = ("Failure", "RegistryUnavailable", "TrackingUnavailable")


class RunCrashed(Exception):
    """A run failed on an unexpected error, whose trace has been printed. Exit 1."""


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
