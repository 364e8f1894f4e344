"""Production failure and security tests: the whole demo (ingest → training → inference) on S3 behind an
endpoint that drops, refuses and delays requests, with secret credentials that must show up nowhere."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest

from animl_assets.core.detect.megadetector import validate_batch_output
from animl_assets.lineage import CROSS_EXPORT
from animl_assets_tests.conftest import assert_artifacts_intact, bucket_objects, quick_demo_config

pytestmark = pytest.mark.slow


def _files_under(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


def test_the_demo_on_a_failing_s3_endpoint_completes_intact_and_leaks_no_credential(chaotic_s3, moto_endpoint,
                                                                                     tmp_path):
    endpoint, chaos = chaotic_s3
    secret_key, key_id = f"sEcReT-{uuid.uuid4().hex}", f"AKIA{uuid.uuid4().hex[:16].upper()}"
    bucket = f"animl-prod-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                      aws_secret_access_key=secret_key)
    s3.create_bucket(Bucket=bucket)
    home = tmp_path / "home"
    env = {**os.environ, "ANIML_HOME": str(home), "DAGSTER_HOME": "",
           "ANIML_STORAGE_URI": f"s3://{bucket}/artifacts", "ANIML_EXPORTS_URI": f"s3://{bucket}/exports",
           "ANIML_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret_key,
           "AWS_SESSION_TOKEN": f"token-{secret_key}", "AWS_MAX_ATTEMPTS": "3"}
    animl = Path(sys.executable).with_name("animl")
    result = subprocess.run([str(animl), "demo", "--run-config", quick_demo_config(tmp_path)], env=env, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    print(f"endpoint faults {dict(chaos.faults)}")
    assert chaos.faults["drop"] > 20 and chaos.faults["503"] > 10 and chaos.faults["delay"] > 10, chaos.faults

    stored = bucket_objects(s3, bucket)
    assert_artifacts_intact(stored, {"crops", "classified_detections", *CROSS_EXPORT})
    [md_key] = [k for k in stored if k.endswith("classified_detections.json")]
    md = json.loads(stored[md_key])
    assert validate_batch_output(md) == [] and any(d.get("classifications") for i in md["images"]
                                                   for d in i.get("detections") or [])

    # no credential anywhere: output, event log and instance, MLflow store and artifacts, caches, the bucket
    secrets = [secret_key, key_id]
    places = {"output": output.encode(), **_files_under(home), **stored}
    assert (home / "dagster").is_dir() and (home / "mlflow.db").is_file()
    leaks = [(where, s) for where, data in places.items() for s in secrets if s.encode() in data]
    assert leaks == []
