"""The new-exports sensor over a local folder and over an S3 prefix (moto over HTTP)."""

import os
import time
from pathlib import Path

import dagster as dg
from dagster_aws.s3 import S3Resource

from animl_assets.definitions import INGEST_JOB, build_definitions
from animl_assets.resources.storage import StoreResource
from animl_assets.settings import Settings


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None, exports: StoreResource):
    """Evaluate the sensor once and apply its partition requests, as the daemon would."""
    sensor = defs.resolve_sensor_def("new_exports")
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"exports": exports},
                                 definitions=defs) as context:
        result = sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def requested(result) -> list[str]:
    return [request.partition_key for request in result.run_requests]


def test_sensor_targets_the_per_export_job(settings):
    sensor = build_definitions(settings).resolve_sensor_def("new_exports")
    assert sensor.job_name == INGEST_JOB


def test_local_folder_sensor_adds_each_export_once(settings, instance):
    defs = build_definitions(settings)
    folder = Path(settings.exports_uri)
    folder.mkdir(parents=True)
    exports = StoreResource(uri=str(folder))
    (folder / "a.json").write_text("{}")
    (folder / "site").mkdir()
    (folder / "site" / "b.json").write_text("{}")
    (folder / "site" / "b.md.json").write_text("{}")  # MegaDetector results beside an export: not an export
    (folder / "site" / "img.jpg").write_bytes(b"x")

    first = tick(defs, instance, None, exports)
    assert sorted(requested(first)) == ["a", "site/b"]
    assert sorted(instance.get_dynamic_partitions("exports")) == ["a", "site/b"]

    second = tick(defs, instance, first.cursor, exports)
    assert requested(second) == [] and second.dynamic_partitions_requests == []

    # a new export, and one copied in with an old timestamp equal to the cursor's (ties are not missed)
    (folder / "c.json").write_text("{}")
    cursor_mtime = os.stat(folder / "site" / "b.json").st_mtime
    (folder / "0_same_time.json").write_text("{}")
    os.utime(folder / "0_same_time.json", (cursor_mtime, cursor_mtime))
    third = tick(defs, instance, second.cursor, exports)
    assert sorted(requested(third)) == ["0_same_time", "c"]
    assert tick(defs, instance, third.cursor, exports).run_requests == []
    assert sorted(instance.get_dynamic_partitions("exports")) == ["0_same_time", "a", "c", "site/b"]


def test_sensor_does_not_re_add_an_export_registered_by_hand(settings, instance):
    defs = build_definitions(settings)
    folder = Path(settings.exports_uri)
    folder.mkdir(parents=True)
    (folder / "manual.json").write_text("{}")
    instance.add_dynamic_partitions("exports", ["manual"])  # what `animl register` does
    result = tick(defs, instance, None, StoreResource(uri=str(folder)))
    assert requested(result) == []


def test_s3_prefix_sensor(moto_endpoint, s3_client, bucket, tmp_path, instance):
    settings = Settings.from_env({"ANIML_HOME": str(tmp_path), "ANIML_EXPORTS_URI": f"s3://{bucket}/exports",
                                  "ANIML_S3_ENDPOINT_URL": moto_endpoint})
    defs = build_definitions(settings)
    exports = StoreResource(uri=settings.exports_uri, s3=S3Resource(endpoint_url=moto_endpoint))
    s3_client.put_object(Bucket=bucket, Key="exports/2024/jan.json", Body=b"{}")
    s3_client.put_object(Bucket=bucket, Key="elsewhere/feb.json", Body=b"{}")  # outside the prefix
    first = tick(defs, instance, None, exports)
    assert requested(first) == ["2024/jan"]
    time.sleep(1.1)  # S3 timestamps have one-second resolution
    s3_client.put_object(Bucket=bucket, Key="exports/2024/feb.json", Body=b"{}")
    second = tick(defs, instance, first.cursor, exports)
    assert requested(second) == ["2024/feb"]
    assert requested(tick(defs, instance, second.cursor, exports)) == []
