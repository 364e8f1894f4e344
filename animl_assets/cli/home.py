"""The Dagster instance folder a command works in, set up once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from animl_assets.cli.common import REPO_DAGSTER_YAML
from animl_assets.core.files import init_lock
from animl_assets.settings import DAGSTER_HOME_VAR, Settings


def ensure_dagster_home(settings: Settings) -> Path:
    """The Dagster instance folder, set up once: DAGSTER_HOME when it is set (and not empty), else
    ANIML_HOME/dagster, where ``dagster.yaml`` is a link to the repository's, so edits there always apply
    (an older copy that differs is left alone, with a warning). A DAGSTER_HOME of the user's own gets a
    copy of the project's dagster.yaml only when it has none. The first command to use a home creates its
    databases under a file lock, so commands started together never migrate them twice.
    """
    if os.environ.get(DAGSTER_HOME_VAR):
        home, managed = Path(os.environ[DAGSTER_HOME_VAR]), False
    else:
        home, managed = settings.dagster_home, True
        os.environ[DAGSTER_HOME_VAR] = str(home)
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
