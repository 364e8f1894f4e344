"""An image archive on S3: the ingest through the Definitions against a one-pass threaded baseline, same run.

    python benchmarks/ingest_s3.py [--images 930] [--scale 3] [--images-dir DIR] [--boxed-share 0.55]
                                   [--train-crops 400] [--train-image-size 128]

N real-size JPEGs (generated, 1280x1024 to 3264x2448, about 0.9 MB each; or the JPEGs in --images-dir) are
uploaded to an archive bucket on moto's S3 server (its own process, over HTTP); a share of them get one or
two animal boxes in a COCO Camera Traps export beside them. With artifacts on S3 too (ANIML_STORAGE_URI),
the ingest job (cct_export, images, md_detections, crops) runs in process through the Definitions. Beside
it, the one-pass baseline: 8 threads, each GET -> decode -> square crop in memory -> PUT, as the reference
crop_detections.py does against cloud storage. Printed for N and N x --scale images: wall time of both and
the ratio; GET/HEAD/PUT per image (counted with botocore's event hooks), bytes read from the archive and
written to the artifact store against the archive's size; peak and final local disk under ANIML_HOME;
peak RSS. Each side runs --repeat (2) times, alternately; the fastest counts. Then training's crop read:
crops/s of a first epoch on S3 storage (an empty crop cache filled concurrently, then the epoch) against the
same crops on local storage, --repeat times alternately, the fastest of each.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import dagster as dg
import numpy as np
from PIL import Image, ImageOps

from animl_assets.core.transfers import parallel_map
from animl_assets.definitions import INGEST_JOB, build_definitions
from animl_assets.resources.storage import S3Requests, s3_client
from animl_assets.settings import Settings

SIZES = [(1280, 1024), (2048, 1536), (2592, 1944), (3264, 2448)]
SPECIES = ["deer", "fox", "raccoon", "turkey", "bobcat", "coyote"]
ARCHIVE, ARTIFACTS = "animl-archive", "animl-artifacts"
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def generated_jpegs(count: int = 8) -> list[bytes]:
    """Camera-trap-sized JPEGs with texture (so they compress like photos, not like flat colour)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        base = Image.fromarray(rng.integers(0, 255, (h // 32, w // 32, 3), dtype=np.uint8)).resize((w, h),
                                                                                                   Image.BICUBIC)
        pixels = np.clip(np.asarray(base, np.int16) + rng.normal(0, 8 if w < 2500 else 4, (h, w, 3)), 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process (its memory is not the pipeline's), on a free local port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server, endpoint
        except OSError:
            time.sleep(0.1)
    raise SystemExit("moto's server did not start (pip install 'moto[server]')")


def upload_archive(client, count: int, jpegs: list[bytes], boxed_share: float) -> tuple[dict, int]:
    """The archive (images/<species>/<n>.jpg) and its export (exports/archive.json); returns (export, bytes)."""
    rng = np.random.default_rng(1)
    images, annotations, total = [], [], 0
    for i in range(count):
        data = jpegs[i % len(jpegs)]
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        species = SPECIES[i % len(SPECIES)]
        images.append({"id": i, "file_name": f"{species}/{i:06d}.jpg", "width": width, "height": height,
                       "location": f"site{i % 12}", "datetime": "2024-06-01 12:00:00"})
        total += len(data)
        if rng.random() < boxed_share:
            for k in range(1 + (rng.random() < 0.8)):
                w, h = rng.uniform(0.08, 0.4) * width, rng.uniform(0.08, 0.4) * height
                annotations.append({"id": len(annotations), "image_id": i, "category_id": 1 + i % len(SPECIES),
                                    "bbox": [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]})
    for _ in parallel_map(lambda image: client.put_object(Bucket=ARCHIVE, Key=f"images/{image['file_name']}",
                                                          Body=jpegs[image["id"] % len(jpegs)]), images):
        pass
    export = {"info": {"version": "1"}, "images": images, "annotations": annotations,
              "categories": [{"id": 0, "name": "empty"}, *({"id": k + 1, "name": s} for k, s in enumerate(SPECIES))]}
    client.put_object(Bucket=ARCHIVE, Key="images/archive.json", Body=json.dumps(export).encode())
    return export, total


def reference_crop(data: bytes, bbox: list[float]) -> bytes:
    """crop_detections.py's square crop of one normalized box, in memory."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
    img_w, img_h = img.size
    xmin, ymin = int(bbox[0] * img_w), int(bbox[1] * img_h)
    box_w, box_h = int(bbox[2] * img_w), int(bbox[3] * img_h)
    size = max(box_w, box_h)
    xmin = max(0, min(xmin - int((size - box_w) / 2), img_w - box_w))
    ymin = max(0, min(ymin - int((size - box_h) / 2), img_h - box_h))
    crop = img.crop((xmin, ymin, xmin + min(img_w, size), ymin + min(img_h, size)))
    if crop.size[0] != crop.size[1]:
        crop = ImageOps.pad(crop, (size, size), color=0)
    out = io.BytesIO()
    crop.save(out, "JPEG")
    return out.getvalue()


def baseline(endpoint: str, export: dict, prefix: str) -> float:
    """The one-pass pipeline: 8 threads of GET -> decode -> square crop -> PUT; returns its wall time."""
    client = s3_client(dg_s3(endpoint))
    boxes: dict[int, list[list[float]]] = {}
    sizes = {image["id"]: (image["width"], image["height"]) for image in export["images"]}
    for a in export["annotations"]:
        w, h = sizes[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        boxes.setdefault(a["image_id"], []).append([x / w, y / h, bw / w, bh / h])
    files = {image["id"]: image["file_name"] for image in export["images"]}

    def one(image_id: int) -> None:
        data = client.get_object(Bucket=ARCHIVE, Key=f"images/{files[image_id]}")["Body"].read()
        for k, bbox in enumerate(boxes[image_id]):
            client.put_object(Bucket=ARTIFACTS, Key=f"{prefix}/{files[image_id]}___crop{k:02d}.jpg",
                              Body=reference_crop(data, bbox))

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, boxes))
    return time.perf_counter() - started


def dg_s3(endpoint: str):
    from dagster_aws.s3 import S3Resource
    return S3Resource(endpoint_url=endpoint)


class DiskSampler:
    """The bytes under a folder, sampled every 0.2 s while it runs: ``peak``."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak, self.stop = folder, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def size(self) -> int:
        return sum(path.stat().st_size for path in self.folder.rglob("*") if path.is_file()) \
            if self.folder.exists() else 0

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                self.peak = max(self.peak, self.size())
            except FileNotFoundError:
                pass

    def __enter__(self) -> "DiskSampler":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.size())


def run_ingest(endpoint: str, home: Path, partition: str,
               prefix: str = "a") -> tuple[float, dg.ExecuteInProcessResult, dict]:
    """The ingest job through the Definitions, artifacts and exports on S3: (wall s, result, seconds per step)."""
    settings = Settings.from_env({"ANIML_HOME": str(home), "ANIML_STORAGE_URI": f"s3://{ARTIFACTS}/{prefix}",
                                  "ANIML_EXPORTS_URI": f"s3://{ARCHIVE}/images", "ANIML_S3_ENDPOINT_URL": endpoint})
    dagster_home = home.parent / f"{home.name}-dagster"
    dagster_home.mkdir()
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        instance.add_dynamic_partitions("exports", [partition])
        started = time.perf_counter()
        result = build_definitions(settings).resolve_job_def(INGEST_JOB).execute_in_process(
            partition_key=partition, instance=instance, raise_on_error=False, run_config=QUIET)
        wall = time.perf_counter() - started
        logs = instance.all_logs(result.run_id)
        starts = {e.step_key: e.timestamp for e in logs if e.dagster_event_type == dg.DagsterEventType.STEP_START}
        step_s = {e.step_key: round(e.timestamp - starts[e.step_key], 1) for e in logs
                  if e.dagster_event_type == dg.DagsterEventType.STEP_SUCCESS}
        return wall, result, step_s


def measure(endpoint: str, client, count: int, jpegs: list[bytes], boxed_share: float, tmp: Path,
            repeat: int) -> dict:
    """Both pipelines on a fresh archive of ``count`` images, alternately ``repeat`` times (this machine's
    timings vary by a third from run to run: the figures are each side's fastest); requests, bytes and disk
    as the first ingest measured them."""
    for bucket in (ARCHIVE, ARTIFACTS):  # a fresh archive and store for each size
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    export, archive_bytes = upload_archive(client, count, jpegs, boxed_share)
    boxed = len({a["image_id"] for a in export["annotations"]})
    home = tmp / f"home-{count}"
    base_times, walls = [], []
    for attempt in range(repeat):
        with S3Requests(prefix_depth=1) as base_requests:
            base_times.append(baseline(endpoint, export, f"baseline-{count}-{attempt}"))
        if attempt == 0:
            with DiskSampler(home) as disk, S3Requests(prefix_depth=9) as requests:
                wall, result, step_s = run_ingest(endpoint, home, "archive")
            if not result.success:
                raise SystemExit("the ingest failed; run it with the console logger for details")
        else:
            wall = run_ingest(endpoint, tmp / f"home-{count}-{attempt}", "archive", f"a{attempt}")[0]
        walls.append(wall)
    wall, base_s = min(walls), min(base_times)
    boxed_files = {f"images/{image['file_name']}" for image in export["images"]
                   if image["id"] in {a["image_id"] for a in export["annotations"]}}
    gets = {key: n for (op, key), n in requests.calls.items() if op == "GetObject" and key.startswith(ARCHIVE)}
    per_image = {key.removeprefix(f"{ARCHIVE}/"): n for key, n in gets.items()}
    meta = result.asset_materializations_for_node("crops")[0].metadata
    full_size_written = sum(n for where, n in requests.bytes_put.items() if "/images/" in where and "/files/" in where)
    return {
        "images": count, "boxed_images": boxed, "boxes": len(export["annotations"]),
        "archive_mb": round(archive_bytes / 1e6, 1),
        "pipeline_s": round(wall, 1), "baseline_s": round(base_s, 1), "ratio": round(wall / base_s, 2),
        "pipeline_runs_s": [round(t, 1) for t in walls], "baseline_runs_s": [round(t, 1) for t in base_times],
        "step_s": step_s,
        "archive_gets_per_boxed_image": round(sum(n for k, n in per_image.items() if k in boxed_files) / boxed, 3),
        "archive_full_gets_of_unboxed_images": sum(n for k, n in per_image.items()
                                                   if k.startswith("images/") and k not in boxed_files
                                                   and not k.endswith(".json")),
        "archive_ranged_gets": requests.count("GetObject(ranged)", ARCHIVE),
        "heads_per_image": round(requests.count("HeadObject", ARCHIVE) / count, 3),
        "puts_per_image": round(requests.count("PutObject", ARTIFACTS) / count, 3),
        "artifact_gets_per_image": round(requests.count("GetObject", ARTIFACTS) / count, 3),
        "archive_mb_read": round(sum(n for k, n in requests.bytes_got.items() if k.startswith(ARCHIVE)) / 1e6, 1),
        "artifact_mb_written": round(sum(requests.bytes_put.values()) / 1e6, 1),
        "full_size_mb_written": round(full_size_written / 1e6, 1),
        "crop_mb_written": round(meta["crop_bytes_written"].value / 1e6, 1),
        "baseline_gets": base_requests.count("GetObject"), "baseline_puts": base_requests.count("PutObject"),
        "peak_disk_mb_under_home": round(disk.peak / 1e6, 1),
        "disk_mb_under_home_after": round(DiskSampler(home).size() / 1e6, 1),
        "peak_disk_share_of_archive": round(disk.peak / archive_bytes, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "home": str(home),
    }


def training_read(endpoint: str, home: Path, limit: int, image_size: int, repeat: int = 2) -> dict:
    """A first epoch over the ingest's crops: S3 storage (an empty crop cache filled concurrently, then the
    epoch) against local storage holding the same crops; ``repeat`` times alternately, the fastest counts (the
    first epoch of a process also pays PyTorch's warm-up, whichever side runs it)."""
    import pandas as pd
    import torch

    from animl_assets.assets.artifacts import cached_crops
    from animl_assets.core.layout import partition_folder
    from animl_assets.core.ml.data import resolve_device
    from animl_assets.core.ml.frames import split_frame
    from animl_assets.core.ml.recipe import TrainingParams
    from animl_assets.core.ml.training import init_model, make_loaders, make_optimizer, train_one_epoch
    from animl_assets.resources.storage import ArtifactStore

    s3_storage = ArtifactStore(uri=f"s3://{ARTIFACTS}/a", s3=dg_s3(endpoint), home=str(home))
    manifest = pd.read_csv(io.BytesIO(s3_storage.store().read_bytes("crops/archive/crops.csv")))[:limit]
    folder = partition_folder("archive")
    ds = pd.DataFrame({"path": [f"{folder}/{crop}" for crop in manifest["crop"]],
                       "label": [file.split("/")[0] for file in manifest["file"]],
                       "dataset": "archive", "location": "site"})
    labels = sorted(ds["label"].unique())
    label_index = {str(i): name for i, name in enumerate(labels)}
    frame = split_frame(ds, label_index, {"train": [["archive", "site"]]}, label_weighted=True)
    params = TrainingParams(model_name="efficientnet-b0", image_size=image_size, batch_size=32, num_workers=2,
                            device="cpu", amp=False, channels_last=False, epochs=1)
    device = resolve_device("cpu")
    torch.manual_seed(0)

    fill: list[float] = []

    def epoch(storage: ArtifactStore) -> float:
        started = time.perf_counter()
        root, _ = cached_crops(storage, list(ds["path"]))
        fill.append(len(ds) / max(time.perf_counter() - started, 1e-9))
        loaders = make_loaders(frame, root, params, device)
        model = init_model(params, len(labels))
        optimizer, _, _ = make_optimizer(model, params, device)
        train_one_epoch(model, loaders["train"], optimizer, torch.amp.GradScaler("cpu", enabled=False), device,
                        amp=False, channels_last=False)
        return len(ds) / (time.perf_counter() - started)

    local_root = home.parent / "local-artifacts"
    local_storage = ArtifactStore(uri=str(local_root), home=str(home))
    runs: dict[str, list[float]] = {"s3": [], "local": []}
    for _ in range(repeat):
        shutil.rmtree(s3_storage.cache("crops"), ignore_errors=True)  # every S3 epoch fetches its crops anew
        runs["s3"].append(epoch(s3_storage))
        if not (local_root / "crops").exists():
            shutil.copytree(s3_storage.cache("crops"), local_root / "crops")
        runs["local"].append(epoch(local_storage))
    on_s3, local = max(runs["s3"]), max(runs["local"])
    return {"train_crops": len(ds), "image_size": image_size, "s3_first_epoch_crops_per_s": round(on_s3, 1),
            "local_first_epoch_crops_per_s": round(local, 1), "local_over_s3": round(local / on_s3, 2),
            "s3_cache_fill_crops_per_s": round(max(fill[0::2]), 1),
            "runs_crops_per_s": {side: [round(v, 1) for v in values] for side, values in runs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=930)
    parser.add_argument("--scale", type=int, default=3, help="also run at images x scale (1: not)")
    parser.add_argument("--images-dir", help="JPEGs of your own to fill the archive with (cycled)")
    parser.add_argument("--boxed-share", type=float, default=0.55, help="share of images with an animal box")
    parser.add_argument("--train-crops", type=int, default=400, help="crops in the training read (0: skip)")
    parser.add_argument("--train-image-size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side per size; the fastest counts")
    args = parser.parse_args()
    jpegs = ([path.read_bytes() for path in sorted(Path(args.images_dir).rglob("*.jpg"))] if args.images_dir
             else generated_jpegs())
    if not jpegs:
        raise SystemExit(f"no JPEGs in {args.images_dir}")
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    server, endpoint = start_moto()
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for bucket in (ARCHIVE, ARTIFACTS):
            client.create_bucket(Bucket=bucket)
        with tempfile.TemporaryDirectory() as tmp:
            for count in [args.images] + ([args.images * args.scale] if args.scale > 1 else []):
                figures = measure(endpoint, client, count, jpegs, args.boxed_share, Path(tmp), args.repeat)
                print(json.dumps(figures), flush=True)
            if args.train_crops:
                # the first size's crops are gone with its store; train on the last size's (still in the store)
                print(json.dumps(training_read(endpoint, Path(figures["home"]), args.train_crops,
                                               args.train_image_size, args.repeat)), flush=True)
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
