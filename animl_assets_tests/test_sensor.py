"""The new-exports sensor over a local folder and over an S3 prefix (moto over HTTP), with real file times."""

import os
import shutil
import time
from pathlib import Path

import dagster as dg
from dagster_aws.s3 import S3Resource

from animl_assets.core.ingest.sample import EXPORT_NAME, write_sample_export
from animl_assets.definitions import INGEST_JOB, build_definitions
from animl_assets.resources import storage
from animl_assets.resources.storage import ExportsLocation
from animl_assets.settings import Settings


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None, exports: ExportsLocation):
    """Evaluate the sensor once and apply its partition requests, as the daemon would."""
    sensor = defs.resolve_sensor_def("new_exports")
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"exports": exports},
                                 definitions=defs) as context:
        result = sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def requested(result) -> list[str]:
    return sorted(request.partition_key for request in result.run_requests)


def test_sensor_targets_the_per_export_job_and_says_what_it_does(settings):
    sensor = build_definitions(settings).resolve_sensor_def("new_exports")
    assert sensor.job_name == INGEST_JOB
    assert "exports location" in sensor.description and "edited in place" in sensor.description


def test_local_folder_sensor_adds_each_export_once(settings, instance):
    defs = build_definitions(settings)
    folder = Path(settings.exports_uri)
    folder.mkdir(parents=True)
    exports = ExportsLocation(uri=str(folder))
    (folder / "a.json").write_text("{}")
    (folder / "site").mkdir()
    (folder / "site" / "b.json").write_text("{}")
    (folder / "site" / "b.md.json").write_text("{}")  # MegaDetector results beside an export: not an export
    (folder / "site" / "img.jpg").write_bytes(b"x")

    first = tick(defs, instance, None, exports)
    assert requested(first) == ["a", "site/b"]
    assert sorted(instance.get_dynamic_partitions("exports")) == ["a", "site/b"]
    second = tick(defs, instance, first.cursor, exports)
    assert requested(second) == [] and second.dynamic_partitions_requests == []
    (folder / "c.json").write_text("{}")
    third = tick(defs, instance, second.cursor, exports)
    assert requested(third) == ["c"]
    assert tick(defs, instance, third.cursor, exports).run_requests == []


def test_an_export_moved_in_with_an_old_file_time_becomes_a_partition(settings, instance, tmp_path):
    """`animl sample-export DIR; touch -d 2025-01-01 DIR/sample_export.json; mv DIR $ANIML_HOME/exports/third`"""
    defs = build_definitions(settings)
    folder = Path(settings.exports_uri)
    folder.mkdir(parents=True)
    exports = ExportsLocation(uri=str(folder))
    (folder / "first.json").write_text("{}")
    cursor = tick(defs, instance, None, exports).cursor
    outside = tmp_path / "outside"
    write_sample_export(outside)
    old = time.mktime((2025, 1, 1, 0, 0, 0, 0, 0, -1))
    os.utime(outside / EXPORT_NAME, (old, old))
    shutil.move(outside, folder / "third")
    assert (folder / "third" / EXPORT_NAME).stat().st_mtime == old
    result = tick(defs, instance, cursor, exports)
    assert requested(result) == ["third/sample_export"]
    assert "third/sample_export" in instance.get_dynamic_partitions("exports")


def test_an_export_edited_in_place_is_ingested_again(settings, instance):
    defs = build_definitions(settings)
    folder = Path(settings.exports_uri)
    folder.mkdir(parents=True)
    exports = ExportsLocation(uri=str(folder))
    export = folder / "site.json"
    export.write_text('{"images": []}')
    first = tick(defs, instance, None, exports)
    assert requested(first) == ["site"]
    export.write_text('{"images": [], "annotations": []}')  # edited in place
    second = tick(defs, instance, first.cursor, exports)
    assert requested(second) == ["site"] and second.dynamic_partitions_requests == []
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    assert tick(defs, instance, second.cursor, exports).run_requests == []
    (folder / "site.md.json").write_text('{"images": []}')  # MegaDetector results added beside it
    assert requested(tick(defs, instance, second.cursor, exports)) == ["site"]


def test_sensor_does_not_re_add_an_export_registered_by_hand(settings, instance):
    defs = build_definitions(settings)
    folder = Path(settings.exports_uri)
    folder.mkdir(parents=True)
    (folder / "manual.json").write_text("{}")
    instance.add_dynamic_partitions("exports", ["manual"])  # what `animl register` does
    result = tick(defs, instance, None, ExportsLocation(uri=str(folder)))
    assert requested(result) == []


def test_s3_prefix_sensor_lists_export_files_not_image_folders(moto_endpoint, s3_client, bucket, tmp_path, instance,
                                                                monkeypatch):
    settings = Settings.from_env({"ANIML_HOME": str(tmp_path), "ANIML_EXPORTS_URI": f"s3://{bucket}/exports",
                                  "ANIML_S3_ENDPOINT_URL": moto_endpoint})
    defs = build_definitions(settings)
    listed_keys: list[str] = []
    make_client = storage.s3_client

    def watched_client(s3):  # every key any LIST returns to the stores' clients
        client = make_client(s3)
        client.meta.events.register("after-call.s3.ListObjectsV2", lambda parsed, **_: listed_keys.extend(
            item["Key"] for item in parsed.get("Contents", [])))
        return client

    monkeypatch.setattr(storage, "s3_client", watched_client)
    exports = ExportsLocation(uri=settings.exports_uri, s3=S3Resource(endpoint_url=moto_endpoint))
    s3_client.put_object(Bucket=bucket, Key="exports/2024/jan.json", Body=b"{}")
    s3_client.put_object(Bucket=bucket, Key="elsewhere/feb.json", Body=b"{}")  # outside the prefix
    for i in range(30):  # an export's images, one folder below it
        s3_client.put_object(Bucket=bucket, Key=f"exports/2024/cam1/img{i:03d}.jpg", Body=b"x")
    first = tick(defs, instance, None, exports)
    assert requested(first) == ["2024/jan"]
    assert listed_keys == ["exports/2024/jan.json"]  # the image folder was never listed
    time.sleep(1.1)  # S3 timestamps have one-second resolution
    s3_client.put_object(Bucket=bucket, Key="exports/2024/feb.json", Body=b"{}")
    second = tick(defs, instance, first.cursor, exports)
    assert requested(second) == ["2024/feb"]
    assert requested(tick(defs, instance, second.cursor, exports)) == []
    s3_client.put_object(Bucket=bucket, Key="exports/2024/feb.json", Body=b'{"edited": true}')  # same second
    assert requested(tick(defs, instance, second.cursor, exports)) == ["2024/feb"]  # the ETag changed
