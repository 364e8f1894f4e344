import pytest

from animl_assets.core.ingest.exports import (
    ExportCursor,
    export_key_for,
    is_export_key,
    mdcache_key_for,
    partition_key_for,
    scan_exports,
)
from animl_assets.core.store import StoredFile


def test_export_keys_and_partitions():
    assert is_export_key("site/2024.json")
    assert not is_export_key("site/2024.md.json") and not is_export_key("a.jpg")
    assert not is_export_key("site/.hidden.json")
    assert partition_key_for("site/2024-05.json") == "site/2024-05"
    assert export_key_for("site/2024-05") == "site/2024-05.json"
    with pytest.raises(ValueError):
        partition_key_for("bad name, with comma.json")


def files(*items):
    return [StoredFile(key, size, mtime) for key, mtime, size in items]


def test_every_unregistered_export_is_new_whatever_its_file_time():
    first = scan_exports(files(("b.json", 2.0, 10), ("a.json", 1.0, 10), ("c.md.json", 3.0, 5)), ExportCursor(), set())
    assert first.new == ["a", "b"] and first.changed == [] and not first.skipped
    # copied in later with a file time older than anything seen (mv, cp -p, rsync -a, unpacked archives)
    listed = files(("a.json", 1.0, 10), ("b.json", 2.0, 10), ("old.json", -1e9, 10))
    second = scan_exports(listed, ExportCursor.parse(first.cursor.serialize()), {"a", "b"})
    assert second.new == ["old"] and second.changed == []
    third = scan_exports(listed, second.cursor, {"a", "b", "old"})
    assert third.new == [] and third.changed == []


def test_an_export_edited_in_place_or_its_md_json_is_changed_with_a_new_run_key():
    registered = {"x"}
    first = scan_exports(files(("x.json", 5.0, 10)), ExportCursor(), registered)
    assert first.new == first.changed == []  # registered by hand: remembered, not run again
    edited = scan_exports(files(("x.json", 5.0, 11)), first.cursor, registered)  # same time, other size
    assert edited.changed == ["x"] and edited.run_key("x") != first.run_key("x")
    with_md = scan_exports(files(("x.json", 5.0, 11), (mdcache_key_for("x.json"), 6.0, 3)), edited.cursor, registered)
    assert with_md.changed == ["x"]
    assert scan_exports(files(("x.json", 5.0, 11), ("x.md.json", 6.0, 3)), with_md.cursor, registered).changed == []


def test_a_registered_export_missing_from_one_listing_is_remembered():
    first = scan_exports(files(("x.json", 5.0, 10)), ExportCursor(), {"x"})
    gone = scan_exports([], first.cursor, {"x"})
    assert gone.cursor.seen == first.cursor.seen
    back = scan_exports(files(("x.json", 7.0, 12)), gone.cursor, {"x"})
    assert back.changed == ["x"]


def test_bad_names_are_reported_and_old_cursors_are_read():
    scan = scan_exports(files(("x.json", 1.0, 1), ("y z.json", 2.0, 1)), ExportCursor(), {"x"})
    assert scan.new == [] and scan.skipped == ["y z.json"]
    assert ExportCursor.parse('{"mtime": 5.0, "key": "a.json"}') == ExportCursor()  # the format before v2
    assert ExportCursor.parse(None) == ExportCursor()
