"""The PostgreSQL profile: a real PostgreSQL server (Debian's packages) on 127.0.0.1, started as an
unprivileged user in a temporary data directory, holds the demo's Dagster instance and MLflow store."""

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from animl_assets_tests.conftest import REPO, free_port, quick_demo_config, unavailable

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
USER, PASSWORD = "animl", "pg-test-password"


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="module")
def postgres():
    """(port, data dir) of a PostgreSQL server for this module; stopped and removed at the end."""
    bindir = _binaries()
    if bindir is None:
        unavailable("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    run_as: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="animl-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root: the package's own system user runs it
        account = pwd.getpwnam("postgres")
        os.chown(folder, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    password_file = folder / "password"
    password_file.write_text(PASSWORD)
    if run_as:
        os.chown(password_file, pwd.getpwnam("postgres").pw_uid, -1)
    data, port = folder / "data", free_port()
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=scram-sha-256",
                    f"--pwfile={password_file}"], check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder}"
    subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-o",
                    options, "-w", "start"], check=True, capture_output=True)
    try:
        db = psycopg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname="postgres",
                             autocommit=True)  # CREATE DATABASE runs outside a transaction
        with db.cursor() as cursor:
            cursor.execute("CREATE DATABASE dagster")
            cursor.execute("CREATE DATABASE mlflow")
        db.close()
        yield port, folder
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def _query(port: int, database: str, sql: str) -> list[tuple]:
    db = psycopg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname=database)
    try:
        with db.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall()
    finally:
        db.close()


def test_the_demo_keeps_runs_events_checks_and_the_mlflow_registry_in_postgresql(postgres, tmp_path):
    port, _ = postgres
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    shutil.copyfile(REPO / "deploy" / "dagster-postgres.yaml", dagster_home / "dagster.yaml")
    env = {**os.environ, "ANIML_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(dagster_home),
           "ANIML_PG_HOST": "127.0.0.1", "ANIML_PG_PORT": str(port), "ANIML_PG_USER": USER,
           "ANIML_PG_PASSWORD": PASSWORD, "ANIML_PG_DB": "dagster",
           "MLFLOW_TRACKING_URI": f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}/mlflow"}
    animl = Path(sys.executable).with_name("animl")
    result = subprocess.run([str(animl), "demo", "--run-config", quick_demo_config(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert PASSWORD not in result.stdout + result.stderr

    runs = dict(_query(port, "dagster", "SELECT status, count(*) FROM runs GROUP BY status"))
    assert runs.get("SUCCESS", 0) >= 4, runs
    materialized = {row[0] for row in _query(port, "dagster",
                    "SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")}
    for asset in ("crops", "classification_dataset", "classifier_checkpoint", "champion_model", "classified_detections"):
        assert any(asset in key for key in materialized), (asset, materialized)
    checks = {row[0] for row in _query(port, "dagster", "SELECT DISTINCT check_name FROM asset_check_executions")}
    assert {"beats_champion", "md_format"} <= checks
    assert _query(port, "mlflow", "SELECT count(*) FROM runs")[0][0] >= 1
    [(alias, version)] = _query(port, "mlflow", "SELECT alias, version FROM registered_model_aliases "
                                              "WHERE name = 'animl-classifier'")
    assert alias == "champion" and version == 1
    # nothing fell back to the embedded SQLite stores
    assert not list((tmp_path / "home").glob("*.db")) and not list(dagster_home.rglob("*.db"))
    assert list((tmp_path / "home" / "mlartifacts").rglob("MLmodel"))  # model files beside, not in, the DB
