import pytest

from animl_assets.core.exports import (ExportCursor, export_key_for, is_export_key, partition_key_for,
                                       select_new_exports)
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
    return [StoredFile(key, 10, mtime) for key, mtime in items]


def test_cursor_orders_by_mtime_then_key_and_never_adds_twice():
    listed = files(("b.json", 2.0), ("a.json", 1.0), ("c.md.json", 3.0))
    new, skipped, cursor = select_new_exports(listed, ExportCursor(), set())
    assert [f.key for f in new] == ["a.json", "b.json"] and not skipped
    assert cursor == ExportCursor(2.0, "b.json")
    again, _, cursor2 = select_new_exports(listed, cursor, {"a", "b"})
    assert again == [] and cursor2 == cursor
    assert ExportCursor.parse(cursor.serialize()) == cursor


def test_a_twin_with_the_same_mtime_listed_later_is_not_missed():
    _, _, cursor = select_new_exports(files(("m.json", 5.0)), ExportCursor(), set())
    listed = files(("m.json", 5.0), ("a.json", 5.0), ("z.json", 6.0), ("old.json", 1.0))
    new, _, cursor = select_new_exports(listed, cursor, {"m"})
    assert [f.key for f in new] == ["a.json", "z.json"]
    assert cursor == ExportCursor(6.0, "z.json")


def test_already_registered_exports_are_skipped_and_bad_names_reported():
    new, skipped, _ = select_new_exports(files(("x.json", 1.0), ("y z.json", 2.0)), ExportCursor(), {"x"})
    assert new == [] and skipped == ["y z.json"]
