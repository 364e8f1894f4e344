"""The MLflow model registry: a classifier logged as a pyfunc model (TorchScript inside, its labels,
preprocessing, thresholds, training params and checkpoint beside it), registered as a new version of a
named model; aliases ``champion`` and ``challenger`` (never stages); lineage as version tags."""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from animl_assets.core.artifact_files import JsonRecord
from animl_assets.core.ml.frames import Preprocessing
from animl_assets.core.paths import redact_credentials
from animl_assets.core.registry.tracking import DAGSTER_RUN_TAG

DEFAULT_MODEL = "animl-classifier"
CHAMPION, CHALLENGER = "champion", "challenger"
PROMOTED_TAG, REPLACING_TAG = "animl.promoted", "animl.replacing"  # how it became champion; whom it replaces
REGISTERED_TAG = "animl.registered_version"  # set last: a version without it was never fully registered
TRAINING_CONFIG_TAG = "animl.training_config"  # the recipe a version was trained with (JSON), for retraining
OUTPUTS_TAG = "animl.outputs"  # a multi-output version's outputs, species first (JSON): what retraining builds
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
# the lineage tags of a registered version, and the assets whose versions they name
ASSET_OF_TAG = {"animl.dataset_version": "classification_dataset", "animl.splits_version": "splits",
                "animl.checkpoint_version": "classifier_checkpoint", "animl.evaluation_version": "classifier_evaluation",
                REGISTERED_TAG: "registered_model"}


@dataclass
class RegisteredVersion(JsonRecord):
    """``registered_model``'s value: a new version of the registered model (alias challenger until the gate
    promotes it), its test figures the gate compares, the margin it must beat the champion by, and its tags."""

    name: str
    version: str
    source: str
    mlflow_run_id: str
    gate_margin: float
    test: dict[str, float | None]
    model_uri: str
    tags: dict[str, str]


@dataclass
class Champion(JsonRecord):
    """``champion_model``'s value: the version the ``champion`` alias was moved to, and the one it replaced."""

    name: str
    version: str
    replaced: str | None
    how: str
    model_uri: str


@dataclass
class ModelFiles:
    """What a registered model is made of (all plain files)."""

    torchscript: bytes
    label_index: dict[str, str]
    preprocessing: dict[str, Any]
    thresholds: dict[str, Any]
    params: dict[str, Any]
    checkpoint: bytes
    onnx: bytes = b""  # empty: the evaluation did not export it (versions from before, or portable: false)
    exported: bytes = b""  # the torch.export program
    open_set: dict[str, Any] = field(default_factory=dict)  # open_set.json: the unknowns' threshold ({}: none)
    prediction_profile: dict[str, Any] = field(default_factory=dict)  # its test predictions, for drift
    # a multi-output model: the TorchScript model of every head and each extra output's label index
    outputs_torchscript: bytes = b""
    output_index: dict[str, dict[str, str]] = field(default_factory=dict)


ONNX_FILE, EXPORT_FILE = "model.onnx", "model.pt2"
OUTPUTS_FILE, OUTPUT_INDEX_FILE = "model_compiled_outputs.pt", "output_index.json"


def preprocessing(prep: Preprocessing) -> dict[str, Any]:
    """``preprocessing.json``: the input a model expects (crops resized and centre-cropped to its size, then
    normalized with its mean and std)."""
    return {**prep.record(), "resize": f"{prep.interpolation} short side, centre crop", "color": "RGB"}


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "torch", "torchvision", "pillow", "pandas")]


def log_model(client: MlflowClient, run_id: str, files: ModelFiles, example: bytes, artifact_path: str = "model") -> str:
    """Save the pyfunc model (with its signature and an input example: one real crop) as artifacts of the
    MLflow run ``run_id``; returns the model's source URI."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    names = [files.label_index[str(i)] for i in range(len(files.label_index))]
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                               outputs=Schema([ColSpec("double", name) for name in names]))
    with tempfile.TemporaryDirectory(prefix="animl-model-") as tmp:
        folder = Path(tmp)
        artifacts = {"torchscript": ("model_compiled.pt", files.torchscript),
                     "label_index": ("label_index.json", files.label_index),
                     "preprocessing": ("preprocessing.json", files.preprocessing),
                     "thresholds": ("thresholds.json", files.thresholds),
                     "params": ("params.json", files.params), "checkpoint": ("ckpt_best.pt", files.checkpoint),
                     **({"onnx": (ONNX_FILE, files.onnx)} if files.onnx else {}),
                     **({"torch_export": (EXPORT_FILE, files.exported)} if files.exported else {}),
                     **({"outputs_torchscript": (OUTPUTS_FILE, files.outputs_torchscript),
                         "output_index": (OUTPUT_INDEX_FILE, files.output_index)} if files.output_index else {}),
                     **{key: (f"{key}.json", value) for key, value in (("open_set", files.open_set),
                                                                       ("prediction_profile", files.prediction_profile))
                        if value}}
        paths = {}
        for key, (name, value) in artifacts.items():
            path = folder / "files" / name
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(value if isinstance(value, bytes) else json.dumps(value, indent=1).encode())
            paths[key] = str(path)
        with warnings.catch_warnings():  # the signature is given: no type hints needed on predict
            warnings.filterwarnings("ignore", message=".*type hints.*")
            mlflow.pyfunc.save_model(folder / artifact_path, python_model=str(MODEL_CODE), artifacts=paths,
                                     signature=signature, input_example=pd.DataFrame({"image": [example]}),
                                     pip_requirements=_requirements(), metadata={
                                         "label_index": files.label_index, "preprocessing": files.preprocessing})
        client.log_artifacts(run_id, str(folder / artifact_path), artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


class RegistryUnavailable(ConnectionError):
    """The registry could not be asked (unreachable, an error on its side): not the same as "no such version".
    A ConnectionError, so callers that retry transient network errors retry it, and nothing reads it as absent."""


def is_absent(err: MlflowException) -> bool:
    """Whether ``err`` says the model, version or alias does not exist (rather than that asking failed)."""
    code = err.error_code
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(err))


def _unavailable(client: MlflowClient, what: str, err: Exception) -> RegistryUnavailable:
    return RegistryUnavailable(f"the model registry at {redact_credentials(str(client._registry_uri))} could not be "
                               f"asked for {what}: {str(err).splitlines()[0][:300]}")


def register(client: MlflowClient, name: str, source: str, run_id: str, tags: Mapping[str, str],
             description: str = "") -> ModelVersion:
    """A new version of registered model ``name`` (created when missing) from ``source``, with ``tags``."""
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if not is_absent(err):
            raise _unavailable(client, f"model {name!r}", err) from err
        client.create_registered_model(name, description="Species classifiers for camera-trap crops "
                                                         "(animl-assets). Aliases: champion, challenger.")
    return client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
                                       description=description)


def by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version ``alias`` points at, or None (no such model or alias). Raises RegistryUnavailable when the
    registry could not be asked: an outage never reads as "no champion"."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if is_absent(err):
            return None
        raise _unavailable(client, f"{name}@{alias}", err) from err


def parse_ref(name: str, ref: str) -> tuple[str, str]:
    """(model name, version or alias) of ``ref``: a number, an alias, or a ``models:/name/3`` /
    ``models:/name@alias`` URI, which names its own model."""
    if not ref.startswith("models:/"):
        return name, ref
    path = ref.removeprefix("models:/")
    model, _, ref = path.partition("@") if "@" in path else path.rpartition("/")
    if not model or not ref:
        raise ValueError(f"{ref!r} is not a model URI (models:/NAME/VERSION or models:/NAME@ALIAS)")
    return model, ref


def resolve(client: MlflowClient, name: str, ref: str) -> ModelVersion:
    """A version of model ``name`` by number or alias (``champion``), or the version a ``models:/name/3`` /
    ``models:/name@alias`` URI names (of that URI's model: read ``.name`` of the result). ValueError when it
    does not exist, RegistryUnavailable when the registry could not be asked."""
    name, ref = parse_ref(name, ref)
    if ref.isdigit():
        try:
            return client.get_model_version(name, ref)
        except MlflowException as err:
            if not is_absent(err):
                raise _unavailable(client, f"{name} version {ref}", err) from err
            raise ValueError(f"registered model {name!r} has no version {ref}") from err
    found = by_alias(client, name, ref)
    if found is None:
        raise ValueError(f"registered model {name!r} has no version with alias {ref!r}")
    return found


def model_files(tracking_uri: str, version: ModelVersion) -> ModelFiles:
    """The files of a registered version, downloaded from its source."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="animl-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=tmp,
                                                         tracking_uri=tracking_uri))
        found = next(local.rglob("model_compiled.pt"), None)
        if found is None:
            raise ValueError(f"model version {version.version} of {version.name!r} holds no animl model files "
                             f"(model_compiled.pt) at {version.source}")
        folder = found.parent
        load = lambda name: json.loads((folder / name).read_text())  # noqa: E731
        optional = lambda name: (folder / name).read_bytes() if (folder / name).is_file() else b""  # noqa: E731
        return ModelFiles((folder / "model_compiled.pt").read_bytes(), load("label_index.json"),
                          load("preprocessing.json"), load("thresholds.json"), load("params.json"),
                          (folder / "ckpt_best.pt").read_bytes(), optional(ONNX_FILE), optional(EXPORT_FILE),
                          json.loads(optional("open_set.json") or b"{}"),
                          json.loads(optional("prediction_profile.json") or b"{}"), optional(OUTPUTS_FILE),
                          json.loads(optional(OUTPUT_INDEX_FILE) or b"{}"))


def promote(client: MlflowClient, name: str, version: str, how: str, reason: str = "") -> str | None:
    """Point ``champion`` at ``version`` (dropping its ``challenger`` alias), recording how and when as tags;
    returns the version that was champion before. The champion it replaces is written on the version before
    the alias moves, so a promotion interrupted after that is finished with the right tags (``repair``)."""
    version = str(version)
    previous = by_alias(client, name, CHAMPION)
    if previous is not None and str(previous.version) == version:  # champion already (an earlier try, or again)
        replaced = previous.tags.get(REPLACING_TAG) or None
    else:
        replaced = str(previous.version) if previous else None
        client.set_model_version_tag(name, version, REPLACING_TAG, replaced or "")
    client.set_registered_model_alias(name, CHAMPION, version)
    challenger = by_alias(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    _promotion_tags(client, name, version, how, replaced, reason)
    return replaced


def _promotion_tags(client: MlflowClient, name: str, version: str, how: str, replaced: str | None,
                    reason: str) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tags = {PROMOTED_TAG: how, "animl.promoted_at": now, "animl.replaced_champion": replaced or ""}
    if reason:
        tags["animl.promotion_reason"] = reason
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def repair(client: MlflowClient, name: str, abandoned: Callable[[ModelVersion], bool]) -> list[str]:
    """Finish or roll back what a killed registration or promotion of model ``name`` left: a version that
    ``abandoned`` says no live run is still registering, and that never got its ``animl.registered_version``
    tag, is deleted (it was never gated); a champion that is also challenger loses the challenger alias; a
    champion without promotion tags gets them. Returns one line per repair."""
    lines = []
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException as err:
        if is_absent(err):
            return []
        raise _unavailable(client, f"the versions of {name!r}", err) from err
    for version in found:
        if version.tags.get(DAGSTER_RUN_TAG) and not version.tags.get(REGISTERED_TAG) and abandoned(version):
            for alias in client.get_model_version(name, str(version.version)).aliases:
                client.delete_registered_model_alias(name, alias)
            client.delete_model_version(name, str(version.version))
            lines.append(f"deleted version {version.version}: its registration was interrupted before the gate")
    champion, challenger = by_alias(client, name, CHAMPION), by_alias(client, name, CHALLENGER)
    if champion is not None and challenger is not None and str(champion.version) == str(challenger.version):
        client.delete_registered_model_alias(name, CHALLENGER)
        lines.append(f"version {champion.version} is champion: dropped its challenger alias (an interrupted promotion)")
    if champion is not None and not champion.tags.get(PROMOTED_TAG):
        _promotion_tags(client, name, str(champion.version), "finished after an interruption",
                        champion.tags.get(REPLACING_TAG) or None, "")
        lines.append(f"version {champion.version} is champion without promotion tags: added them")
    return lines


def kept_versions(client: MlflowClient) -> dict[str, set[str]]:
    """The asset versions registered models were made from, per asset (``animl gc`` keeps them)."""
    kept: dict[str, set[str]] = {}
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name = '{model.name}'"):
            for tag, asset in ASSET_OF_TAG.items():
                if version.tags.get(tag):
                    kept.setdefault(asset, set()).add(version.tags[tag])
    return kept
