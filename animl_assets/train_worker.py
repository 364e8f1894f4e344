"""One rank of a distributed training, started by ``torchrun`` (``python -m torch.distributed.run
--nproc-per-node N -m animl_assets.train_worker SPEC.json``), e.g. through Dagster Pipes from the
``classifier_checkpoint`` asset. Every rank trains its shard (DDP: gloo on CPU, NCCL on GPUs); rank 0 writes
the checkpoints, logs each epoch to MLflow and reports progress to Dagster through Pipes."""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from animl_assets.core.ml.recipe import Checkpoints, TrainingParams
from animl_assets.core.registry import tracking
from animl_assets.settings import TORCHRUN_LOCAL_RANK


@dataclass
class WorkerSpec:
    """What every rank needs, handed over as JSON in a private temporary folder beside the frame it trains on
    (``frame_csv``) and the starting weights when they are loaded ones (``init_path``)."""

    frame_csv: str
    crops_root: str
    num_classes: int
    params: TrainingParams
    store_uri: str
    folder: str  # the checkpoints' folder in the store
    resume: bool
    s3: dict[str, Any] | None = None  # the S3 resource's fields (endpoint, region, credentials), for S3 stores
    init: bool | str = False
    init_path: str = ""
    mlflow: dict[str, str] = field(default_factory=dict)  # tracking_uri, home, run_id: rank 0 logs epochs there

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))
        path.chmod(0o600)

    @classmethod
    def read(cls, path: str | Path) -> WorkerSpec:
        data = json.loads(Path(path).read_text())
        return cls(**{**data, "params": TrainingParams(**data["params"])})

    def store(self) -> Any:
        """The checkpoint store, opened as the asset's storage resource opens it."""
        from dagster_aws.s3 import S3Resource

        from animl_assets.resources.storage import open_store

        return open_store(self.store_uri, S3Resource(**self.s3) if self.s3 else None)


def main(spec_path: str) -> None:
    """Train this rank's shard of the spec at ``spec_path``."""
    import pandas as pd
    import torch
    import torch.distributed as dist

    from animl_assets.core.artifact_files import read_checkpoint
    from animl_assets.core.ml.training import train_classifier

    spec = WorkerSpec.read(spec_path)
    params = spec.params
    cuda = torch.cuda.is_available() and params.device != "cpu"
    if cuda and params.device == "auto":  # this rank's own GPU
        params = replace(params, device=f"cuda:{os.environ.get(TORCHRUN_LOCAL_RANK, '0')}")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank0 = dist.get_rank() == 0
    pipes: Any = nullcontext(None)
    if rank0:
        from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

        pipes = open_dagster_pipes() if os.environ.get(DAGSTER_PIPES_CONTEXT_ENV_VAR) else nullcontext(None)
    with pipes as context:
        run_id = spec.mlflow.get("run_id")
        client = tracking.open_client(spec.mlflow["tracking_uri"], spec.mlflow["home"]) if rank0 and run_id else None

        def say(line: str) -> None:
            if context is not None:
                context.log.info(line)
            else:
                print(line, flush=True)

        def on_epoch(metrics: dict[str, float]) -> None:
            if client is not None:
                tracking.log_metrics(client, run_id, {k: v for k, v in metrics.items() if k != "epoch"},
                                     metrics["epoch"])
            say(f"epoch {metrics['epoch'] + 1}/{params.epochs} on {dist.get_world_size()} processes: "
                f"val top-1 {metrics['val/acc_top1']:.3f}, {metrics['train/crops_per_s']:.1f} crops/s per process")

        frame = pd.read_csv(spec.frame_csv, dtype={"dataset": str, "location": str, "path": str})
        init = read_checkpoint(spec.init_path) if spec.init_path else spec.init
        train_classifier(frame, spec.crops_root, spec.num_classes, params, Checkpoints(spec.store(), spec.folder),
                         init=init, resume=spec.resume, on_epoch=on_epoch, progress=say)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
