"""Every environment variable the project reads or sets, written once: its name, default, the ``Settings``
field and the resource fields it feeds, and its help line. ``Settings``, the Definitions' resources and the
CLI's help are all made from this table (the core never reads env vars)."""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import dagster as dg


@dataclass(frozen=True)
class Variable:
    """One deployment variable."""

    name: str
    setting: str  # the Settings field it fills
    feeds: tuple[tuple[str, str], ...]  # (resource key, resource field) pairs it configures
    default: str  # as the help shows it
    help: str
    also: tuple[str, ...] = ()  # other variables read, in order, when this one is unset (AWS's own names)
    kind: Callable[[str], Any] = str

    def read(self, env: Mapping[str, str]) -> str:
        """The value ``env`` gives this variable (an empty string counts as unset), or ''."""
        return next((env[name] for name in (self.name, *self.also) if env.get(name)), "")

    def reference(self, env: Mapping[str, str]) -> Any:
        """A ``dg.EnvVar`` naming the variable that ``env`` sets (the launchpad shows names, never values)."""
        name = next(name for name in (self.name, *self.also) if env.get(name))
        return dg.EnvVar.int(name) if self.kind is int else dg.EnvVar(name)


HOME_VAR = "ANIML_HOME"
EXECUTOR_VAR = "ANIML_EXECUTOR"
HOME_FIELDS = (("storage", "home"), ("exports", "home"), ("image_source", "home"), ("mlflow", "home"))
VARIABLES = (
    Variable(HOME_VAR, "home", HOME_FIELDS, "./.animl",
             "where everything lives by default: artifacts/, exports/, cache/ and dagster/ (the Dagster instance, "
             "unless DAGSTER_HOME is set)"),
    Variable("ANIML_EXPORTS_URI", "exports_uri", (("exports", "uri"),), "$ANIML_HOME/exports",
             "exports location, watched for COCO Camera Traps files"),
    Variable("ANIML_EXPORTS_MAX_DEPTH", "exports_max_depth", (("exports", "max_depth"),), "1",
             "how many folders deep the sensor looks for exports", kind=int),
    Variable("ANIML_STORAGE_URI", "storage_uri", (("storage", "uri"),), "$ANIML_HOME/artifacts", "artifact store"),
    Variable("ANIML_IMAGES_URI", "images_uri", (("image_source", "uri"),), "",
             "where image keys are resolved when an export names no root"),
    Variable("ANIML_ALLOWED_IMAGE_ROOTS", "allowed_image_roots", (("image_source", "allowed_roots"),), "",
             "comma-separated folders or s3:// prefixes an export may name as its images root (besides its own "
             "folder, ANIML_IMAGES_URI and roots given to register)"),
    Variable("ANIML_S3_ENDPOINT_URL", "s3_endpoint_url", (("s3", "endpoint_url"),), "",
             "S3-compatible endpoint (MinIO, moto); credentials from the usual AWS variables",
             also=("AWS_ENDPOINT_URL",)),
    Variable("AWS_REGION", "s3_region", (("s3", "region_name"),), "us-east-1", "the S3 region",
             also=("AWS_DEFAULT_REGION",)),
    Variable("MLFLOW_TRACKING_URI", "mlflow_tracking_uri", (("mlflow", "tracking_uri"),),
             "sqlite:///$ANIML_HOME/mlflow.db", "MLflow tracking and registry"),
    Variable("ANIML_MLFLOW_UI_URL", "mlflow_ui_url", (("mlflow", "ui_url"),), "",
             "the MLflow UI's address, for links in asset metadata"),
    Variable("ANIML_MLFLOW_ARTIFACTS_URI", "mlflow_artifacts_uri", (("mlflow", "artifacts_uri"),),
             "$ANIML_HOME/mlartifacts", "where run artifacts and models go when MLflow is a database (sqlite://, "
             "postgresql://): a folder or s3:// prefix"),
    Variable(EXECUTOR_VAR, "executor", (), "one process",
             "k8s: each step in its own Kubernetes pod (dagster-k8s; deploy/)"),
)
TORCHRUN_LOCAL_RANK = "LOCAL_RANK"  # torchrun's: which of the machine's GPUs a training rank drives
DAGSTER_HOME_VAR = "DAGSTER_HOME"  # Dagster's own: the instance folder ($ANIML_HOME/dagster when unset)
# MLflow's own variables, set (when unset) so that an unreachable server fails in seconds and logs stay quiet.
# the resources the variables feed, by their keys in the Definitions
RESOURCES = ("s3", "storage", "exports", "image_source", "mlflow")

MLFLOW_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
MLFLOW_QUIET = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def env_help() -> str:
    """The CLI's help on the environment, one entry per variable."""
    lines = ["environment:"]
    for variable in VARIABLES:
        also = f"; or {', '.join(variable.also)}" if variable.also else ""
        text = variable.help + also + (f" ({variable.default})" if variable.default else "")
        name = f"  {variable.name:<24} "
        if len(name) > 27:  # a long name on its own line
            lines.append(name.rstrip())
            name = ""
        lines.append(textwrap.fill(text, width=108, initial_indent=name.ljust(27), subsequent_indent=" " * 27))
    return "\n".join(lines + ["Any location may be a local folder or an s3://bucket/prefix."])


ENV_HELP = env_help()


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
    executor: str = ""

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings an environment describes; a variable set to the empty string counts as unset."""
        env = os.environ if env is None else env
        values = {v.setting: v.kind(v.read(env)) for v in VARIABLES if v.read(env)}
        home = Path(values.pop("home", ".animl")).expanduser().absolute()
        return cls(home=home, storage_uri=values.pop("storage_uri", str(home / "artifacts")),
                   exports_uri=values.pop("exports_uri", str(home / "exports")),
                   images_uri=values.pop("images_uri", ""), s3_endpoint_url=values.pop("s3_endpoint_url", None),
                   s3_region=values.pop("s3_region", "us-east-1"), **values)

    def resource_fields(self) -> dict[str, dict[str, Any]]:
        """Each resource's fields, holding these settings' values."""
        fields: dict[str, dict[str, Any]] = {resource: {} for resource in RESOURCES}
        for variable in VARIABLES:
            value = getattr(self, variable.setting)
            for resource, field in variable.feeds:
                fields[resource][field] = str(value) if isinstance(value, Path) else value
        return fields


def referenced_fields(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Each resource's fields as ``dg.EnvVar`` references to the variables ``env`` sets, read when a run starts;
    unset ones keep the resources' defaults under ANIML_HOME (S3's region: us-east-1)."""
    fields: dict[str, dict[str, Any]] = {resource: {} for resource in RESOURCES}
    fields["s3"] |= {"endpoint_url": None, "region_name": "us-east-1"}
    for variable in VARIABLES:
        if variable.read(env):
            for resource, field in variable.feeds:
                fields[resource][field] = variable.reference(env)
    return fields


def describe(resource: str, field: str) -> str:
    """A resource field's description: the variable that sets it, its help and its default."""
    variable = next(v for v in VARIABLES if (resource, field) in v.feeds)
    return f"{variable.name}: {variable.help}" + (f" (default {variable.default})." if variable.default else ".")
