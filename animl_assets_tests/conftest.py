"""Shared fixtures: a sample export, a real Dagster instance in a temp dir, and moto's S3 server over HTTP."""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import boto3
import dagster as dg
import pytest

from animl_assets.core.artifact_files import INDEX, content_version, listed_files
from animl_assets.core.ingest.exports import partition_key_for
from animl_assets.core.ingest.sample import BROKEN, EXPORT_NAME, write_sample_export
from animl_assets.definitions import INGEST_JOB, build_definitions
from animl_assets.lineage import CROSS_EXPORT
from animl_assets.settings import Settings

REPO = Path(__file__).resolve().parents[1]
# `animl demo --run-config` for tests of storage, lineage and services rather than accuracy: the demo's model
# trained one epoch at 32 px, every loader in the step's own process, no ONNX or torch.export copies
# (test_demo_home keeps the full demo; test_timm_backbones and test_evaluation_core test those copies).
QUICK_DEMO = {"ops": {"classifier_checkpoint": {"config": {"image_size": 32, "epochs": 1, "finetune": 1,
                                                           "num_workers": 0}},
                      "classifier_evaluation": {"config": {"num_workers": 0, "portable": False}}}}


def quick_demo_config(folder: Path) -> str:
    """The path of a run-config file holding QUICK_DEMO, written into ``folder``."""
    path = folder / "quick_demo.json"
    path.write_text(json.dumps(QUICK_DEMO))
    return str(path)
ENA24 = REPO.parent / "shared" / "data" / "ena24_small"

# The files that take longest, longest first: --dist loadfile hands files to the workers in collection order, so
# these start at once and the suite ends on short files on both workers, not on one long file alone.
LONGEST_FILES = ("test_demo_home.py", "test_concurrency.py", "test_production.py", "test_faults.py",
                 "test_registry_assets.py", "test_definitions_and_cli.py", "test_lineage.py", "test_animl_export.py",
                 "test_storage.py",
                 "test_training_assets.py", "test_training_core.py", "test_faults_gc.py", "test_ingest_assets.py",
                 "test_postgres.py", "test_review_loop.py", "test_crop_shards.py", "test_multi_output.py",
                 "test_empty_model.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run LONGEST_FILES first, in that order; the other files keep theirs."""
    rank = {name: place for place, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture()
def quick_retries(monkeypatch) -> None:
    """Steps run in this process retry as their RetryPolicy says, without the waits between attempts."""
    monkeypatch.setattr(dg.RetryPolicy, "calculate_delay", lambda policy, attempt_num: 0)



def unavailable(message: str) -> NoReturn:
    """Stop a test whose outside requirement (data, a Debian package) is missing: a skip that says so, and
    a failure under CI, which provides everything."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def shared_data(folder: Path) -> Path:
    """``folder`` of ../shared test data; where it is absent the test is skipped saying so (a failure in CI)."""
    if not (folder / "md_annotations.json").is_file():
        unavailable(f"needs the ENA24 sample images at {folder} (../shared/data/ena24_small beside the "
                    "repository; CI and the project's workspace have it, a plain clone does not)")
    return folder


@pytest.fixture(scope="session")
def ena24_dir() -> Path:
    return shared_data(ENA24)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """The generated sample export (read-only for tests; copy it before changing it)."""
    out = tmp_path_factory.mktemp("sample")
    write_sample_export(out)
    return out


@pytest.fixture()
def animl_home(tmp_path) -> Path:
    return tmp_path / "animl"


@pytest.fixture()
def settings(animl_home) -> Settings:
    return Settings.from_env({"ANIML_HOME": str(animl_home)})


@pytest.fixture()
def instance(tmp_path):
    """A real, persistent DagsterInstance (SQLite) configured by the project's dagster.yaml."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


def add_export(settings: Settings, instance: dg.DagsterInstance, source: Path, folder: str = "sample") -> str:
    """Copy an export folder (JSON + images beside it) into the local exports location; register it."""
    shutil.copytree(source, Path(settings.exports_uri) / folder)
    partition = partition_key_for(f"{folder}/{EXPORT_NAME}")
    instance.add_dynamic_partitions("exports", [partition])
    return partition


def run_job(settings: Settings, dagster_home: Path, job: str, partition: str | None = None,
            selection: list[dg.AssetKey] | None = None, **ops):
    """Run ``job`` of the Definitions over a home in this process (``ops``: each op's config); the result, once
    it is known to have succeeded."""
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        result = build_definitions(settings).resolve_job_def(job).execute_in_process(
            instance=instance, raise_on_error=False, partition_key=partition, asset_selection=selection,
            run_config={"ops": {name: {"config": config} for name, config in ops.items()}})
    assert result.success, [e.step_failure_data.error.to_string() for e in result.get_step_failure_events()]
    return result


def run_ingest(settings: Settings, instance: dg.DagsterInstance, partition: str, run_config=None):
    """Materialize the per-export job through the Definitions for one partition."""
    defs = build_definitions(settings)
    return defs.resolve_job_def(INGEST_JOB).execute_in_process(
        partition_key=partition, instance=instance, run_config=run_config or {}, raise_on_error=False
    )


def _ephemeral_ports() -> range:
    """The kernel's range for outgoing connections' local ports (Linux; the IANA range elsewhere)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 49152, 65535
    return range(low, high + 1)


def free_port(avoid: int | None = None) -> int:
    """A TCP port free on 127.0.0.1 right now, below the ephemeral range: a busy test beside it (thousands of
    HTTP connections) cannot take it as a connection's local port before the server binds it."""
    ephemeral = _ephemeral_ports()
    candidates = range(20000, ephemeral.start) if ephemeral.start > 21000 else range(10000, 20000)
    for port in random.sample(candidates, 200):
        if port == avoid:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {candidates}")


def group_members(group: int) -> list[int]:
    """The live (not zombie) processes of process group ``group``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


BIND_FAILED = "address already in use"


@contextmanager
def dagster_ui(home: Path, log: Path, timeout_s: float = 600, attempts: int = 3,
               started: list[subprocess.Popen] | None = None) -> Iterator[str]:
    """``animl ui`` (dagster dev: webserver and daemon) on 127.0.0.1 over ``home``; yields its base URL once
    it answers (the ``animl`` process is appended to ``started``), and stops the whole process group at the
    end. A port taken in the meantime (the webserver
    logs the bind error and hangs) is retried on another port."""
    for attempt in range(1, attempts + 1):
        port = free_port()
        with log.open("w") as out:
            process = subprocess.Popen(
                [str(Path(sys.executable).with_name("animl")), "ui", "--host", "127.0.0.1", "--port", str(port)],
                cwd=REPO, env={**os.environ, "ANIML_HOME": str(home), "DAGSTER_HOME": ""}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        if started is not None:
            started.append(process)
        try:
            answered = _wait_for_ui(f"http://127.0.0.1:{port}", process, log, timeout_s)
            if answered:
                yield f"http://127.0.0.1:{port}"
                return
        finally:
            _stop_group(process)
        if BIND_FAILED not in log.read_text() or attempt == attempts:
            not_daemon = [line for line in log.read_text().splitlines() if "dagster.daemon" not in line]
            pytest.fail(f"the UI did not answer in {timeout_s:.0f} s (attempt {attempt}); its log without the "
                        "daemon's lines:\n" + "\n".join(not_daemon[-60:]))


def _wait_for_ui(base: str, process: subprocess.Popen, log: Path, timeout_s: float) -> bool:
    """Whether the webserver at ``base`` answered before the timeout, the process's end or a bind error. Asked
    from a local port below the ephemeral range: a test beside it that churns through thousands of S3
    connections can leave no ephemeral port to ask from. The last error is logged for the failure message."""
    deadline, host_port, last_error = time.monotonic() + timeout_s, urlsplit(base), ""
    while time.monotonic() < deadline and process.poll() is None:
        source = free_port(avoid=host_port.port)  # never the server's own port: a socket would connect to itself
        connection = http.client.HTTPConnection(host_port.hostname, host_port.port, timeout=10,
                                                source_address=("127.0.0.1", source))
        try:
            connection.request("GET", "/server_info")
            if connection.getresponse().status == 200:
                return True
        except (OSError, http.client.HTTPException) as err:
            if BIND_FAILED in log.read_text():
                return False
            if repr(err) != last_error:  # each new reason once, not once a second
                last_error = repr(err)
                with log.open("a") as out:
                    out.write(f"(test) /server_info: {last_error}\n")
            time.sleep(1)
        finally:
            connection.close()
    return False


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM a process group (its leader may be gone, a child not), SIGKILL it after a minute."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="session")
def moto_endpoint() -> str:
    """moto's S3 server listening on 127.0.0.1; boto3 talks to it over real HTTP."""
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3_client(moto_endpoint):
    return boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")


@pytest.fixture()
def bucket(s3_client) -> str:
    """A fresh bucket per test, created by the test itself."""
    name = f"animl-test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log drowns test failures


@pytest.fixture(scope="session")
def sample_counts(sample_dir) -> dict[str, int]:
    """What the sample export holds, counted from its JSON (so tests follow the generator)."""
    cct = json.loads((sample_dir / EXPORT_NAME).read_text())
    broken = {f"broken/{name}.jpg" for name in BROKEN}
    files = {image["id"]: image["file_name"] for image in cct["images"]}
    boxes = [files[a["image_id"]] for a in cct["annotations"] if a.get("bbox")]
    return {
        "images": len(cct["images"]), "good": len(cct["images"]) - len(broken), "broken": len(broken),
        "present": len(cct["images"]) - 1,  # every file but broken/missing.jpg exists
        "locations": len({image["location"] for image in cct["images"]}),
        "boxed_images": len(set(boxes)), "boxes": len(boxes),
        "crops": sum(file not in broken for file in boxes),
        "unboxed_images": len(cct["images"]) - len(set(boxes)),
    }


def table_rows(value) -> list[dict]:
    """The records of a ``MetadataValue.table`` as dicts."""
    assert isinstance(value, dg.TableMetadataValue), f"not a table: {type(value).__name__}"
    return [dict(record.data) for record in value.records]


class _FaultyS3Proxy(ThreadingHTTPServer):
    """An HTTP proxy in front of moto's server that cuts the body of the first GET of each object in half
    (the full Content-Length is announced, then the connection closes): a truncated S3 response."""

    daemon_threads = True

    def __init__(self, upstream: str, chaos: Chaos | None = None) -> None:
        self.upstream = urlsplit(upstream)
        self.truncated: list[str] = []
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        self.chaos = chaos
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


@dataclass
class Chaos:
    """An endpoint failing at random instead of truncating (seeded; at most ``max_faults`` faults): drops
    the connection before forwarding, answers 503 SlowDown, or forwards late."""

    drop: float = 0.1
    unavailable: float = 0.05
    delay: float = 0.05
    max_delay_s: float = 0.3
    max_faults: int = 5000
    seed: int = 0
    faults: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def draw(self) -> str:
        """The fault for the next request: "drop", "503", "delay" or "" (forward as is)."""
        self.faults["requests"] += 1
        if sum(self.faults.values()) - self.faults["requests"] >= self.max_faults:
            return ""
        r = self.rng.random()
        fault = ("drop" if r < self.drop else "503" if r < self.drop + self.unavailable
                 else "delay" if r < self.drop + self.unavailable + self.delay else "")
        if fault:
            self.faults[fault] += 1
        return fault


SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        server: _FaultyS3Proxy = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if server.chaos is not None:
            with server.lock:
                fault = server.chaos.draw()
                pause = server.chaos.rng.uniform(0.02, server.chaos.max_delay_s)
            if fault == "drop":  # the connection closes with no answer at all
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault == "503":
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
            if fault == "delay":
                time.sleep(pause)
        upstream = http.client.HTTPConnection(server.upstream.hostname, server.upstream.port, timeout=30)
        upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
        response = upstream.getresponse()
        data = response.read()
        object_get = self.command == "GET" and "list-type" not in self.path and response.status == 200
        with server.lock:
            cut = server.chaos is None and object_get and len(data) > 64 and self.path not in server.seen
            if object_get:  # the first GET is cut, even after a HEAD of the same object
                server.seen.add(self.path)
            if cut:
                server.truncated.append(self.path)
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        # a HEAD has no body: its Content-Length is the object's, as upstream announced it
        self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD"
                         else str(len(data)))
        if cut:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data[: len(data) // 2] if cut else data)
        if cut:
            self.wfile.flush()
            self.close_connection = True
        upstream.close()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward


@pytest.fixture()
def chaotic_s3(moto_endpoint):
    """(endpoint URL of a proxy that drops 10% of requests, answers 503 to 5%, delays 5%, the Chaos). One
    request in 300 fails all three of a client's tries, so the steps' own retries are used too; every fault
    costs a client backoff (about 0.5 s), which at twice these rates was most of the demo's time."""
    chaos = Chaos()
    proxy = _FaultyS3Proxy(moto_endpoint, chaos)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{proxy.server_address[1]}", chaos
    proxy.shutdown()


@pytest.fixture()
def faulty_s3(moto_endpoint):
    """(endpoint URL of the truncating proxy, the proxy) for the test's duration."""
    proxy = _FaultyS3Proxy(moto_endpoint)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{proxy.server_address[1]}", proxy
    proxy.shutdown()


def bucket_objects(client, bucket: str) -> dict[str, bytes]:
    """Every object in ``bucket``: key -> bytes."""
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def assert_artifacts_intact(stored: dict[str, bytes], assets: set[str]) -> None:
    """Each of ``assets`` has artifact sets among the ``stored`` objects, every set reads back whole (gzip
    CRCs, JSON to the end), and each cross-export version's files hash to its folder name."""
    indexes = [key for key in stored if key.endswith(f"/{INDEX}")]
    assert {key.split("/")[1] for key in indexes} >= assets
    for key in indexes:
        folder = key[: -len(INDEX) - 1]
        index = json.loads(stored[key])
        files = {file: stored[f"{folder}/{file}"] for file in listed_files(index)}
        for name, data in files.items():
            data = gzip.decompress(data) if name.endswith(".gz") else data
            if name.endswith((".json", ".json.gz")):
                json.loads(data)
        if folder.split("/")[1] in CROSS_EXPORT:
            assert content_version(files) == folder.rsplit("/", 1)[1], folder


def latest_version(settings: Settings, instance: dg.DagsterInstance, asset: str) -> Path:
    """The folder of the version of ``asset`` its latest materialization wrote (local artifact store)."""
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None, f"{asset} was never materialized"
    version = event.asset_materialization.metadata["version"].value
    return Path(settings.storage_uri) / asset / version


def _build_dataset_home(root: Path, sample_dir: Path) -> None:
    """The sample export ingested under ``root``/animl and one dataset version and splits built, with its
    Dagster instance in ``root``/dagster (the project's dagster.yaml)."""
    from animl_assets.definitions import DATASET_JOB

    settings = Settings.from_env({"ANIML_HOME": str(root / "animl")})
    dagster_home = root / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_bytes((REPO / "dagster.yaml").read_bytes())
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        partition = add_export(settings, instance, sample_dir)
        assert run_ingest(settings, instance, partition).success
        assert build_definitions(settings).resolve_job_def(DATASET_JOB).execute_in_process(instance=instance).success


@pytest.fixture(scope="session")
def built_dataset_home(tmp_path_factory, sample_dir, worker_id) -> Path:
    """One dataset home per pytest run (``_build_dataset_home``), built by the first xdist worker that needs
    it; tests get copies of it (``dataset_home``)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = (base if worker_id == "master" else base.parent) / "built_dataset_home"
    with FileLock(f"{shared}.lock"):
        if not (shared / "complete").is_file():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            _build_dataset_home(shared, sample_dir)
            (shared / "complete").touch()
    return shared


def dataset_home(root: Path, built: Path) -> tuple[Settings, Path]:
    """A copy under ``root`` of the run's dataset home (``built_dataset_home``): the sample export ingested,
    one dataset version and splits; returns its settings and its DAGSTER_HOME. Homes are relocatable: their
    artifacts are found by key under ANIML_HOME and their events hold no path that a run reads back."""
    for part in ("animl", "dagster"):
        shutil.copytree(built / part, root / part, symlinks=True)
    return Settings.from_env({"ANIML_HOME": str(root / "animl")}), root / "dagster"
