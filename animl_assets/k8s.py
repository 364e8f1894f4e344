"""Kubernetes: the step pods' resources (GPU steps on GPU nodes) and the executor that runs each step in its
own pod (dagster-k8s's ``k8s_job_executor``, chosen with ``ANIML_EXECUTOR=k8s``; deploy/ has the rest)."""

from typing import Any, Mapping

import dagster as dg

from animl_assets.settings import EXECUTOR_VAR

# Training, evaluation and inference: one GPU, on a GPU node (the NVIDIA GPU operator's label), tolerating
# the taint GPU node pools carry so that CPU work stays off them.
GPU_K8S_CONFIG: dict[str, Any] = {
    "container_config": {"resources": {"requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                                       "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"}}},
    "pod_spec_config": {"node_selector": {"nvidia.com/gpu.present": "true"},
                        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}
GPU_TAGS = {"dagster-k8s/config": GPU_K8S_CONFIG}

# Every other step (ingest, crops, dataset, registry): CPU pods; crops use every core they get.
EXECUTOR_CONFIG: dict[str, Any] = {
    "max_concurrent": 8,
    "step_k8s_config": {"container_config": {"resources": {"requests": {"cpu": "2", "memory": "4Gi"},
                                                           "limits": {"memory": "8Gi"}}}},
}


def executor(env: Mapping[str, str]) -> dg.ExecutorDefinition | None:
    """``k8s_job_executor`` (each step its own Kubernetes Job) when ANIML_EXECUTOR=k8s; else Dagster's default."""
    choice = env.get(EXECUTOR_VAR, "")
    if choice in ("", "default"):
        return None
    if choice != "k8s":
        raise ValueError(f"ANIML_EXECUTOR={choice!r}: use k8s, or leave it unset")
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError as err:
        raise ImportError("ANIML_EXECUTOR=k8s needs dagster-k8s: pip install 'animl-assets[k8s]'") from err
    return k8s_job_executor.configured(EXECUTOR_CONFIG, name="k8s_job_executor")
