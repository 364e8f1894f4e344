"""The MLflow resource: where trainings are tracked and models registered."""

from pathlib import Path

import dagster as dg
from mlflow import MlflowClient
from pydantic import Field

from animl_assets.core.tracking import embedded_tracking_uri, open_client


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking and model registry (MLFLOW_TRACKING_URI). Empty: the embedded store,
    sqlite:///$ANIML_HOME/mlflow.db with artifacts under $ANIML_HOME/mlartifacts (``animl mlflow-ui``)."""

    tracking_uri: str = Field(default="", description="MLFLOW_TRACKING_URI: any MLflow tracking URI (http(s) "
                                                      "server, database). Empty: SQLite under home.")
    home: str = Field(default=".animl", description="ANIML_HOME: where the embedded store lives.")
    artifacts_uri: str = Field(default="", description="ANIML_MLFLOW_ARTIFACTS_URI: run artifacts and models "
                                                       "of a database store (folder or s3:// prefix). Empty: "
                                                       "$ANIML_HOME/mlartifacts.")
    ui_url: str = Field(default="", description="ANIML_MLFLOW_UI_URL: the MLflow UI's address, for links in "
                                                "asset metadata (an http(s) tracking URI is used when empty).")

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

    def client(self) -> MlflowClient:
        return open_client(self.uri, self.home)
