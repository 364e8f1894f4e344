"""One rank of a distributed training, started by ``torchrun`` (``python -m torch.distributed.run
--nproc-per-node N -m animl_assets.train_worker SPEC.json``), e.g. through Dagster Pipes from the
``classifier_checkpoint`` asset. Every rank trains its shard (DDP: gloo on CPU, NCCL on GPUs); rank 0 writes
the checkpoints, logs each epoch to MLflow and reports progress to Dagster through Pipes."""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist

from animl_assets.core import tracking
from animl_assets.core.models import read_checkpoint
from animl_assets.core.training import Checkpoints, TrainingParams, train_classifier


def open_store(uri: str, endpoint_url: str | None) -> Any:
    """The checkpoint store: a local folder, or an S3 prefix through boto3."""
    from animl_assets.resources.storage import LocalStore, S3Store, parse_s3_uri

    if not uri.startswith("s3://"):
        return LocalStore(uri)
    import boto3

    bucket, prefix = parse_s3_uri(uri)
    return S3Store(boto3.client("s3", endpoint_url=endpoint_url), bucket, prefix)


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    params = TrainingParams(**spec["params"])
    cuda = torch.cuda.is_available() and params.device != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank0 = dist.get_rank() == 0
    pipes: Any = nullcontext(None)
    if rank0:
        from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

        pipes = open_dagster_pipes() if os.environ.get(DAGSTER_PIPES_CONTEXT_ENV_VAR) else nullcontext(None)
    with pipes as context:
        client = tracking.open_client(spec["tracking_uri"], spec["home"]) if rank0 and spec.get("run_id") else None

        def say(line: str) -> None:
            if context is not None:
                context.log.info(line)
            else:
                print(line, flush=True)

        def on_epoch(metrics: dict[str, float]) -> None:
            if client is not None:
                tracking.log_metrics(client, spec["run_id"], {k: v for k, v in metrics.items() if k != "epoch"},
                                     metrics["epoch"])
            say(f"epoch {metrics['epoch'] + 1}/{params.epochs} on {dist.get_world_size()} processes: "
                f"val top-1 {metrics['val/acc_top1']:.3f}, {metrics['train/crops_per_s']:.1f} crops/s per process")

        frame = pd.read_csv(spec["frame_csv"], dtype={"dataset": str, "location": str, "path": str})
        init = read_checkpoint(spec["init_path"]) if spec.get("init_path") else spec.get("init", False)
        checkpoints = Checkpoints(open_store(spec["store_uri"], spec.get("s3_endpoint_url")), spec["folder"])
        train_classifier(frame, spec["crops_root"], spec["num_classes"], params, checkpoints, init=init,
                         resume=spec["resume"], on_epoch=on_epoch, progress=say)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
