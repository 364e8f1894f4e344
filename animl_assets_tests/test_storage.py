import os
import socket
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import dagster as dg
import pytest
from dagster_aws.s3 import S3Resource

from animl_assets.core.paths import UnsafePathError, redact_credentials
from animl_assets.resources.storage import MULTIPART_BYTES, LocalStore, S3Store, StoreResource, open_store, parse_s3_uri
from animl_assets.settings import Settings


def exercise(store):
    """The Store contract, the same for a local folder and an S3 prefix."""
    assert not store.exists("a/b.json") and store.stat("a/b.json") is None
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/b.json")
    store.write_bytes("a/b.json", b"{}")
    store.write_bytes("a/c/d.jpg", b"\xff\xd8")
    store.write_bytes("top.txt", b"x")
    assert store.read_bytes("a/b.json") == b"{}"
    assert store.stat("a/c/d.jpg").size == 2
    assert sorted(f.key for f in store.list("a")) == ["a/b.json", "a/c/d.jpg"]
    assert sorted(f.key for f in store.list()) == ["a/b.json", "a/c/d.jpg", "top.txt"]
    assert [f.key for f in store.list(suffix=".json")] == ["a/b.json"]
    assert sorted(f.key for f in store.list(max_depth=1)) == ["a/b.json", "top.txt"]  # a/c/ is never read
    assert [f.key for f in store.list(max_depth=0)] == ["top.txt"]
    child = store.child("a")
    assert child.read_bytes("c/d.jpg") == b"\xff\xd8"
    assert [f.key for f in child.list("c")] == ["c/d.jpg"]
    store.write_bytes("a/b.json", b'{"v": 2}')  # overwrite
    assert store.read_bytes("a/b.json") == b'{"v": 2}'
    store.delete("a/b.json")
    assert not store.exists("a/b.json")
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(UnsafePathError):
            store.write_bytes(bad, b"")
    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp) / "small.csv", Path(tmp) / "large.csv.gz"
        small.write_bytes(b"path,a\n")
        large.write_bytes(os.urandom(MULTIPART_BYTES + 1000))  # S3: the multipart upload
        store.put_file("up/small.csv", small)
        store.put_file("up/large.csv.gz", large)
        assert store.read_bytes("up/small.csv") == small.read_bytes()
        assert store.read_bytes("up/large.csv.gz") == large.read_bytes()
        with pytest.raises(UnsafePathError):
            store.put_file("../escape.csv", small)


def test_local_store_contract(tmp_path):
    exercise(LocalStore(tmp_path / "root"))


def test_putting_a_large_file_streams_it(tmp_path):
    big = tmp_path / "classifier_output.csv.gz"
    big.write_bytes(os.urandom(32 << 20))
    store = LocalStore(tmp_path / "root")
    tracemalloc.start()
    store.put_file("classifications/x/classifier_output.csv.gz", big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB held for a 32 MiB file"
    assert store.stat("classifications/x/classifier_output.csv.gz").size == 32 << 20


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    store.write_bytes("f.json", b"old")

    def fail_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("f.json", b"new, half written")
    monkeypatch.undo()
    assert store.read_bytes("f.json") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_get_the_umask_mode_like_any_file(tmp_path, umask):
    """The atomic writer's temp file is 0600; what it renames into place must be what open() gives."""
    code = (
        "import os, sys, numpy as np\n"
        f"os.umask({umask})\n"
        "from animl_assets.core.files import atomic_write\n"
        "from animl_assets.core.detect.crops import encode_jpeg\n"
        "from animl_assets.resources.storage import LocalStore\n"
        "d = sys.argv[1]\n"
        "open(os.path.join(d, 'plain.txt'), 'w').close()\n"
        "atomic_write(os.path.join(d, 'atomic.json'), b'{}')\n"
        "LocalStore(d).write_bytes('sub/store.csv', b'a')\n"
        "LocalStore(d).write_bytes('crop.jpg', encode_jpeg(np.zeros((4, 4, 3), np.uint8)))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.rglob("*") if path.is_file()}
    assert modes == dict.fromkeys(["plain.txt", "atomic.json", "store.csv", "crop.jpg"], 0o666 & ~umask)


def test_s3_store_contract_over_http(moto_endpoint, s3_client, bucket):
    exercise(S3Store(s3_client, bucket, "some/prefix"))
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert "some/prefix/top.txt" in keys


def test_store_resource_picks_s3_through_dagster_aws(moto_endpoint, s3_client, bucket, tmp_path):
    resource = StoreResource(uri=f"s3://{bucket}/artifacts", s3=S3Resource(endpoint_url=moto_endpoint))
    store = resource.store()
    assert isinstance(store, S3Store)
    store.write_bytes("x/y.csv", b"a,b\n")
    assert s3_client.get_object(Bucket=bucket, Key="artifacts/x/y.csv")["Body"].read() == b"a,b\n"
    assert isinstance(StoreResource(uri=str(tmp_path)).store(), LocalStore)


def test_s3_uri_parsing():
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        parse_s3_uri("s3:///prefix")
    assert isinstance(open_store("/tmp/x"), LocalStore)


@pytest.mark.parametrize("uri", ["s3://bucket/prefix?versionId=3", "s3://bucket/prefix#x", "s3://user:pw@bucket/p"])
def test_storage_uris_with_a_query_or_credentials_are_refused(uri):
    with pytest.raises(ValueError) as caught:
        parse_s3_uri(uri)
    assert "pw" not in str(caught.value)


def test_redact_credentials_hides_userinfo_in_any_text():
    text = 'Could not connect to the endpoint URL: "http://user:secret@127.0.0.1:9/b/k" (and s3://a:b@c/d)'
    assert redact_credentials(text) == ('Could not connect to the endpoint URL: "http://***@127.0.0.1:9/b/k" '
                                        "(and s3://***@c/d)")


@pytest.mark.usefixtures("quick_retries")
def test_credentials_in_the_endpoint_url_reach_neither_output_nor_event_log(tmp_path, monkeypatch, capsys,
                                                                            moto_endpoint, bucket, sample_dir):
    from animl_assets.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("ANIML_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", "")
    monkeypatch.setenv("ANIML_STORAGE_URI", f"s3://{bucket}/artifacts")
    # moto's server, with a user and password in the URL: S3 still works (it signs with access keys)
    monkeypatch.setenv("ANIML_S3_ENDPOINT_URL", moto_endpoint.replace("http://", "http://user:secret@"))
    assert main(["register", str(sample_dir / "sample_export.json")]) == 0
    # an endpoint that does not answer: botocore's message names the endpoint, without the password
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("ANIML_S3_ENDPOINT_URL", f"http://user:secret@127.0.0.1:{closed}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert main(["materialize", "sample_export"]) != 0
    captured = capsys.readouterr()
    assert f"127.0.0.1:{closed}" in captured.out + captured.err
    assert "secret" not in captured.out + captured.err
    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    logged = "\n".join(str(entry) for run in instance.get_runs() for entry in instance.all_logs(run.run_id))
    assert f"127.0.0.1:{closed}" in logged and "secret" not in logged


def test_truncated_s3_bodies_are_retried(faulty_s3, s3_client, bucket):
    endpoint, proxy = faulty_s3
    data = os.urandom(50_000)
    s3_client.put_object(Bucket=bucket, Key="p/big.bin", Body=data)
    store = open_store(f"s3://{bucket}/p", S3Resource(endpoint_url=endpoint))
    assert store.read_bytes("big.bin") == data
    assert proxy.truncated == [f"/{bucket}/p/big.bin"]  # the first answer was cut, the retry was whole


def test_everything_on_s3_through_truncating_responses(faulty_s3, s3_client, bucket, tmp_path, instance, sample_dir,
                                                       sample_counts):
    """Artifacts and images on S3; the first GET of every object returns half its body."""
    from animl_assets_tests.conftest import bucket_objects, run_ingest

    endpoint, proxy = faulty_s3
    for path in sample_dir.rglob("*"):
        if path.is_file():
            s3_client.put_object(Bucket=bucket, Key=f"images/{path.relative_to(sample_dir)}", Body=path.read_bytes())
    settings = Settings.from_env({
        "ANIML_HOME": str(tmp_path / "home"), "ANIML_STORAGE_URI": f"s3://{bucket}/artifacts",
        "ANIML_EXPORTS_URI": f"s3://{bucket}/images", "ANIML_S3_ENDPOINT_URL": endpoint})
    instance.add_dynamic_partitions("exports", ["sample_export"])
    result = run_ingest(settings, instance, "sample_export")
    assert result.success
    images = result.asset_materializations_for_node("images")[0].metadata
    # listed, not copied: one HEAD each; the zero-byte file is the one present file that is no image
    assert images["num_present"].value == sample_counts["present"] - 1 and images["num_fetch_failed"].value == 0
    assert images["num_bad"].value == 0  # no transport fault recorded as a property of an image
    crops = result.asset_materializations_for_node("crops")[0].metadata
    assert crops["num_crops"].value == sample_counts["crops"]
    assert crops["num_failed_images"].value == sample_counts["broken"]  # decoded once, by crops: the broken ones
    cut_images = {path for path in proxy.truncated if path.startswith(f"/{bucket}/images/")}
    # the one read of every boxed image was cut in half, retried whole, and cropped
    assert len(cut_images) >= sample_counts["boxed_images"] - sample_counts["broken"]
    assert not [key for key in bucket_objects(s3_client, bucket) if "/files/" in key]  # no mirror
