"""Hostile names: no export file name or S3 key reads or writes outside its folder or prefix."""

import pytest
from dagster_aws.s3 import S3Resource

from animl_assets.core.paths import UnsafePathError
from animl_assets.resources.storage import open_store

ESCAPING = ["../outside.txt", "a/../../outside.txt", "/etc/passwd", "..\\..\\outside.txt", "a\x00b.txt",
            "C:/Windows/outside.txt"]
# Percent-encoded dots and slashes are names, not paths: they stay literal, inside the folder or prefix.
ENCODED = ["%2e%2e/outside.txt", "..%2foutside.txt", "%2E%2E%2Foutside.txt", "a%00b.txt"]


@pytest.fixture(params=["local", "s3"])
def stores(request, tmp_path, moto_endpoint, s3_client, bucket):
    """(store on a folder or prefix, the whole bucket or the folder's parent, list of every key there)."""
    if request.param == "local":
        root = tmp_path / "root" / "inner"
        root.mkdir(parents=True)
        return (open_store(str(root)), open_store(str(tmp_path / "root")),
                lambda: sorted(str(p.relative_to(tmp_path / "root")) for p in (tmp_path / "root").rglob("*")
                               if p.is_file()))
    s3 = S3Resource(endpoint_url=moto_endpoint)
    return (open_store(f"s3://{bucket}/root/inner", s3), open_store(f"s3://{bucket}/root", s3),
            lambda: sorted(o["Key"].removeprefix("root/")
                           for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])))


@pytest.mark.parametrize("name", ESCAPING)
def test_escaping_names_can_neither_write_nor_read(stores, name):
    store, parent, keys = stores
    parent.write_bytes("outside.txt", b"not yours")
    with pytest.raises(UnsafePathError):
        store.write_bytes(name, b"x")
    with pytest.raises(UnsafePathError):
        store.read_bytes(name)
    assert keys() == ["outside.txt"]


@pytest.mark.parametrize("name", ENCODED)
def test_encoded_names_stay_literal_inside_the_folder(stores, name):
    store, parent, keys = stores
    parent.write_bytes("outside.txt", b"not yours")
    store.write_bytes(name, b"mine")
    assert store.read_bytes(name) == b"mine"
    assert parent.read_bytes("outside.txt") == b"not yours"
    assert all(key == "outside.txt" or key.startswith("inner/") for key in keys()), keys()
