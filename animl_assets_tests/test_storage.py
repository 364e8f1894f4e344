import os

import pytest
from dagster_aws.s3 import S3Resource

from animl_assets.core.paths import UnsafePathError
from animl_assets.resources.storage import LocalStore, S3Store, StoreResource, open_store, parse_s3_uri


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


def test_local_store_contract(tmp_path):
    exercise(LocalStore(tmp_path / "root"))


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
