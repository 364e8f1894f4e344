"""Deployment settings read from the environment, in one place (the core never reads env vars)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

# The variables a deployment sets, and the resource field each one fills.
ENV_VARS = {
    "ANIML_HOME": "home",
    "ANIML_STORAGE_URI": "uri",
    "ANIML_EXPORTS_URI": "uri",
    "ANIML_IMAGES_URI": "uri",
    "ANIML_ALLOWED_IMAGE_ROOTS": "allowed_roots",
    "MLFLOW_TRACKING_URI": "tracking_uri",
    "ANIML_MLFLOW_UI_URL": "ui_url",
    "ANIML_MLFLOW_ARTIFACTS_URI": "artifacts_uri",
}
ENV_HELP = """environment:
  ANIML_HOME               where everything lives by default (./.animl): artifacts/, exports/, cache/ and
                           dagster/ (the Dagster instance, unless DAGSTER_HOME is set)
  ANIML_EXPORTS_URI        exports location, watched for COCO Camera Traps files ($ANIML_HOME/exports)
  ANIML_EXPORTS_MAX_DEPTH  how many folders deep the sensor looks for exports (1)
  ANIML_STORAGE_URI        artifact store ($ANIML_HOME/artifacts)
  ANIML_IMAGES_URI         where image keys are resolved when an export names no root
  ANIML_ALLOWED_IMAGE_ROOTS  comma-separated folders or s3:// prefixes an export may name as its images
                           root (besides its own folder, ANIML_IMAGES_URI and roots given to register)
  ANIML_S3_ENDPOINT_URL    S3-compatible endpoint (MinIO, moto); credentials from the usual AWS variables
  MLFLOW_TRACKING_URI      MLflow tracking and registry (sqlite:///$ANIML_HOME/mlflow.db)
  ANIML_MLFLOW_UI_URL      the MLflow UI's address, for links in asset metadata
  ANIML_MLFLOW_ARTIFACTS_URI  where run artifacts and models go when MLflow is a database (sqlite://,
                           postgresql://): a folder or s3:// prefix ($ANIML_HOME/mlartifacts)
  ANIML_EXECUTOR           k8s: each step in its own Kubernetes pod (dagster-k8s; deploy/); unset: one process
Any location may be a local folder or an s3://bucket/prefix."""


@dataclass(frozen=True)
class Settings:
    """Where everything lives. Defaults make an embedded, credential-free set-up under ANIML_HOME."""

    home: Path
    storage_uri: str
    exports_uri: str
    images_uri: str
    s3_endpoint_url: str | None
    s3_region: str
    exports_max_depth: int = 1
    allowed_image_roots: str = ""
    mlflow_tracking_uri: str = ""
    mlflow_ui_url: str = ""
    mlflow_artifacts_uri: str = ""

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings an environment describes; a variable set to the empty string counts as unset."""
        env = os.environ if env is None else env
        home = Path(env.get("ANIML_HOME") or ".animl").expanduser().absolute()
        return cls(
            home=home,
            storage_uri=env.get("ANIML_STORAGE_URI") or str(home / "artifacts"),
            exports_uri=env.get("ANIML_EXPORTS_URI") or str(home / "exports"),
            images_uri=env.get("ANIML_IMAGES_URI") or "",
            s3_endpoint_url=env.get("ANIML_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL") or None,
            s3_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            exports_max_depth=int(env.get("ANIML_EXPORTS_MAX_DEPTH") or 1),
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or "",
            mlflow_ui_url=env.get("ANIML_MLFLOW_UI_URL") or "",
            mlflow_artifacts_uri=env.get("ANIML_MLFLOW_ARTIFACTS_URI") or "",
            allowed_image_roots=env.get("ANIML_ALLOWED_IMAGE_ROOTS") or "",
        )
