"""The MLflow resource: where trainings are tracked and models registered."""

import os
from pathlib import Path

import dagster as dg
from mlflow import MlflowClient
from pydantic import Field

from animl_assets.core.registry.tracking import TrackingUnavailable, check_reachable, embedded_tracking_uri, open_client
from animl_assets.settings import MLFLOW_HTTP_LIMITS, describe


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking and model registry (MLFLOW_TRACKING_URI). Empty: the embedded store,
    sqlite:///$ANIML_HOME/mlflow.db with artifacts under $ANIML_HOME/mlartifacts (``animl mlflow-ui``)."""

    tracking_uri: str = Field(default="", description=describe("mlflow", "tracking_uri") + " Any MLflow tracking URI "
                              "(http(s) server, database); empty: SQLite under home.")
    home: str = Field(default=".animl", description=describe("mlflow", "home"))
    artifacts_uri: str = Field(default="", description=describe("mlflow", "artifacts_uri"))
    ui_url: str = Field(default="", description=describe("mlflow", "ui_url") + " An http(s) tracking URI is used "
                        "when empty.")

    @property
    def uri(self) -> str:
        return self.tracking_uri or embedded_tracking_uri(self.home)

    @property
    def artifact_root(self) -> str | None:
        """Where a database-backed store (the embedded SQLite, or PostgreSQL) keeps run artifacts and models;
        None for a tracking server, which decides itself."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return None
        if self.artifacts_uri:
            return self.artifacts_uri
        return (Path(self.home).expanduser().absolute() / "mlartifacts").as_uri()

    def check_server(self) -> None:
        """An http(s) server is asked whether it answers, within a short budget (TrackingUnavailable, one line,
        instead of MLflow's minutes of silent retries); a database store needs no asking."""
        if self.uri.startswith(("http://", "https://")):
            # MLflow's own HTTP retries (7 tries, doubling from 2 s, 120 s timeouts) leave a user staring at
            # silence for many minutes when the server is gone; these bound a request to about a minute
            for name, value in MLFLOW_HTTP_LIMITS.items():
                os.environ.setdefault(name, value)
            check_reachable(self.uri)

    def connect(self) -> MlflowClient:
        """A client on the store, once ``check_server`` passes."""
        self.check_server()
        return open_client(self.uri, self.home)

    def client(self) -> MlflowClient:
        """``connect`` for a step: a server that does not answer fails it at once, with no step retries on top
        of the ones ``check_reachable`` made."""
        try:
            return self.connect()
        except TrackingUnavailable as err:
            raise dg.Failure(str(err), allow_retries=False) from err
