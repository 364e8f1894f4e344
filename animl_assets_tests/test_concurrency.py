"""Runs at once on one home, on S3 behind an endpoint that drops, refuses and delays requests: two new
exports ingesting while a training runs, one ingest killed mid-way. Every run completes or fails with a
message naming its step, a re-run recovers, and no artifact in the bucket is corrupt."""

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import dagster as dg
import pytest
import yaml

from animl_assets.cli import main
from animl_assets.core.ingest.sample import EXPORT_NAME, write_sample_export
from animl_assets.definitions import INGEST_JOB, TRAIN_JOB
from animl_assets.lineage import CROSS_EXPORT, newest_record
from animl_assets_tests.conftest import assert_artifacts_intact, bucket_objects

pytestmark = pytest.mark.slow
ANIML = str(Path(sys.executable).with_name("animl"))
TRAINING = {"model_name": "efficientnet-lite0", "pretrained": "lite0", "image_size": 32, "epochs": 1,
            "finetune": 1, "batch_size": 16, "num_workers": 0, "progress_every": 0}
CLEAR_FAILURE = re.compile(r"animl \S+: error: |step \S+ failed")


def _first_run(instance: dg.DagsterInstance, job: str, partition: str | None) -> dg.RunRecord:
    tags = {"dagster/partition": partition} if partition else {}
    return instance.get_run_records(dg.RunsFilter(job_name=job, tags=tags), ascending=True)[0]


def test_two_exports_and_a_training_at_once_complete_or_fail_clearly_and_recover(chaotic_s3, moto_endpoint,
                                                                                 tmp_path, monkeypatch):
    endpoint, chaos = chaotic_s3
    bucket = f"animl-runs-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    home = tmp_path / "home"
    direct = {"ANIML_HOME": str(home), "DAGSTER_HOME": "", "ANIML_S3_ENDPOINT_URL": moto_endpoint,
              "ANIML_STORAGE_URI": f"s3://{bucket}/artifacts", "ANIML_EXPORTS_URI": f"s3://{bucket}/exports"}
    failing = {**direct, "ANIML_S3_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "3"}

    # in this process, on a healthy endpoint: a first export and its dataset, two new exports registered only
    for name, value in direct.items():
        monkeypatch.setenv(name, value)
    exports = {name: write_sample_export(tmp_path / name, seed=seed, images_per_class_and_location=per)
               for name, seed, per in (("a", 0, 2), ("b", 1, 1), ("c", 2, 1))}
    for name in exports:
        assert main(["register", str(tmp_path / name / EXPORT_NAME), "--name", name,
                     *(["--no-run"] if name != "a" else [])]) == 0
    assert main(["build-dataset"]) == 0
    training = tmp_path / "training.yaml"
    training.write_text(yaml.safe_dump({"ops": {"classifier_checkpoint": {"config": TRAINING}}}))

    # at once, on the failing endpoint: ingest b, ingest c, train on a's dataset
    commands = {"b": ["materialize", "b"], "c": ["materialize", "c"], "train": ["train", "--run-config", str(training)]}
    logs = {name: (tmp_path / f"{name}.out").open("w+") for name in commands}
    runs = {name: subprocess.Popen([ANIML, *args], env={**os.environ, **failing}, stdout=logs[name],
                                   stderr=subprocess.STDOUT, start_new_session=True, text=True)
            for name, args in commands.items()}
    # c is killed (its process group, as the kernel's OOM killer or a lost node would) once it is cropping
    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    deadline = time.monotonic() + 600
    while newest_record(instance, "md_detections", "c") is None and runs["c"].poll() is None:
        assert time.monotonic() < deadline, "c never reached its crops"
        time.sleep(0.2)
    killed, killed_at = runs["c"].poll() is None, time.time()
    if killed:
        os.killpg(runs["c"].pid, signal.SIGKILL)
    outcomes = {name: run.wait(timeout=900) for name, run in runs.items()}
    outputs = {}
    for name, log in logs.items():
        log.seek(0)
        outputs[name] = log.read()
        log.close()

    print(f"outcomes {outcomes} (c killed: {killed}); endpoint faults {dict(chaos.faults)}")
    assert sum(chaos.faults.values()) > 20, chaos.faults
    first = {name: _first_run(instance, job, partition) for name, job, partition in
             (("b", INGEST_JOB, "b"), ("c", INGEST_JOB, "c"), ("train", TRAIN_JOB, None))}
    spans = {name: (r.start_time, r.end_time or killed_at) for name, r in first.items()}
    assert max(a for a, _ in spans.values()) < min(b for _, b in spans.values()), spans  # all three at once

    # a failure says which step and why; a failed or killed run completes when run again (in this process)
    for name, value in failing.items():
        monkeypatch.setenv(name, value)
    for name, code in outcomes.items():
        if name == "c" and killed:
            assert code == -signal.SIGKILL
        elif code != 0:
            assert CLEAR_FAILURE.search(outputs[name]), outputs[name][-4000:]
        if code != 0:
            assert main(commands[name]) == 0, name

    # the recovered exports join the next dataset, and every artifact set in the bucket is whole
    assert main(["build-dataset"]) == 0
    for name in exports:
        assert newest_record(instance, "crops", name) is not None
    newest = newest_record(instance, "classification_dataset")
    assert set(newest.asset_materialization.metadata["exports_read"].data) == set(exports)
    assert_artifacts_intact(bucket_objects(s3, bucket), {"crops", *CROSS_EXPORT})
