"""MLflow tracking for trainings, through ``MlflowClient`` (no global state): one run per Dagster run,
found again by its ``dagster.run_id`` tag when the run is re-executed (a resume continues the same MLflow
run); dataset versions as MLflow dataset inputs; per-epoch metrics; artifacts."""

from __future__ import annotations

import json
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunTag

from animl_assets.core.files import init_lock
from animl_assets.core.paths import redact_credentials

DAGSTER_RUN_TAG = "dagster.run_id"
TRAINING_KEY_TAG = "animl.training_key"  # what a training learns from and how: the same key resumes


class TrackingUnavailable(ConnectionError):
    """The MLflow tracking server does not answer."""


def check_reachable(uri: str, tries: int = 3, timeout_s: float = 5.0) -> None:
    """Raise TrackingUnavailable unless the http(s) server of ``uri`` accepts a connection within ``tries``
    attempts (``timeout_s`` each, 1 s then 2 s apart): well under a minute in all."""
    parsed = urlsplit(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    error: OSError | None = None
    for attempt in range(tries):
        try:
            with socket.create_connection((parsed.hostname or "localhost", port), timeout=timeout_s):
                return
        except OSError as err:
            error = err
            if attempt < tries - 1:
                time.sleep(2 ** attempt)
    raise TrackingUnavailable(f"the MLflow tracking server {redact_credentials(uri)} does not answer ({error}; "
                              f"{tries} tries): start it, or point MLFLOW_TRACKING_URI at one that runs")


def embedded_tracking_uri(home: str | Path) -> str:
    """The default store: SQLite under ANIML_HOME."""
    return f"sqlite:///{Path(home).expanduser().absolute() / 'mlflow.db'}"


def open_client(tracking_uri: str, home: str | Path) -> MlflowClient:
    """A client on ``tracking_uri``; an embedded SQLite store is created (migrated) under the init lock."""
    if tracking_uri.startswith("sqlite:"):
        with init_lock(home):
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            client.search_experiments(max_results=1)  # creates and migrates the database
        return client
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id(client: MlflowClient, name: str, artifact_root: str | None = None) -> str:
    """The experiment ``name``, created (artifacts under ``artifact_root``/name when given) if missing."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None
    return client.create_experiment(name, artifact_location=location)


def find_or_start_run(client: MlflowClient, experiment: str, dagster_run_id: str, run_name: str,
                      tags: Mapping[str, str], resumes: Callable[[Run], bool] | None = None) -> tuple[str, bool]:
    """The MLflow run of this Dagster run (re-opened when it exists); else the newest unfinished run of the
    same training (same ``tags['animl.training_key']``) that ``resumes`` accepts, continued by this one (a
    training killed with its run, resumed later); else a new one. Returns (id, continued)."""
    found = client.search_runs([experiment], filter_string=f"tags.`{DAGSTER_RUN_TAG}` = '{dagster_run_id}'",
                               max_results=1)
    if not found and resumes is not None and tags.get(TRAINING_KEY_TAG):
        unfinished = client.search_runs([experiment], filter_string=f"tags.`{TRAINING_KEY_TAG}` = "
                                        f"'{tags[TRAINING_KEY_TAG]}' and attributes.status != 'FINISHED'",
                                        order_by=["attributes.start_time DESC"], max_results=20)
        found = [run for run in unfinished if resumes(run)][:1]
        if found:
            client.set_tag(found[0].info.run_id, DAGSTER_RUN_TAG, dagster_run_id)
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = client.create_run(experiment, run_name=run_name, tags={DAGSTER_RUN_TAG: dagster_run_id, **tags})
    return run.info.run_id, False


@contextmanager
def training_run(client: MlflowClient, experiment: str, dagster_run_id: str, run_name: str,
                 tags: Mapping[str, str], resumes: Callable[[Run], bool] | None = None
                 ) -> Iterator[tuple[str, bool]]:
    """The life of one training's MLflow run: found or started (``find_or_start_run``), FINISHED when the
    block ends, FAILED when it raises. Yields (run id, continued)."""
    run_id, reopened = find_or_start_run(client, experiment, dagster_run_id, run_name, tags, resumes)
    try:
        yield run_id, reopened
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def unfinished_runs(client: MlflowClient, experiment_prefix: str = "animl/") -> list[Run]:
    """The RUNNING runs of the experiments named ``experiment_prefix``…, newest first."""
    experiments = [e.experiment_id for e in client.search_experiments() if e.name.startswith(experiment_prefix)]
    if not experiments:
        return []
    return client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'",
                              order_by=["attributes.start_time DESC"], max_results=1000)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Parameters as strings; on a re-opened run only those not logged yet (MLflow params are write-once)."""
    logged = client.get_run(run_id).data.params
    fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
    for start in range(0, len(fresh), 100):
        client.log_batch(run_id, params=fresh[start:start + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Numeric metrics at ``step`` (the epoch)."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                      if isinstance(v, (int, float))])


def log_dataset(client: MlflowClient, run_id: str, name: str, version: str, source: str,
                profile: Mapping[str, Any], context: str = "training") -> None:
    """An input dataset: its name, its version as the digest, where it lives, and a profile."""
    dataset = Dataset(name=name, digest=version, source_type="animl-artifacts",
                      source=json.dumps({"uri": source}), profile=json.dumps(dict(profile)))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])


def log_artifacts(client: MlflowClient, run_id: str, artifact_path: str, files: Mapping[str, bytes]) -> None:
    """Files (name -> bytes) as artifacts of the run, under ``artifact_path``."""
    with tempfile.TemporaryDirectory(prefix="animl-mlflow-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        client.log_artifacts(run_id, tmp, artifact_path=artifact_path)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def run_url(tracking_uri: str, ui_url: str, experiment: str, run_id: str) -> str:
    """The run's page in the MLflow UI: under ``ui_url`` if given, else under an http(s) tracking server;
    empty for an embedded store without a UI address."""
    base = ui_url or (tracking_uri if tracking_uri.startswith(("http://", "https://")) else "")
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}" if base else ""
