import pytest

from animl_assets.core.paths import UnsafePathError, safe_relative_path


@pytest.mark.parametrize("name, expected", [
    ("a.jpg", "a.jpg"),
    ("loc1/cam2/a.jpg", "loc1/cam2/a.jpg"),
    ("./loc1//a.jpg", "loc1/a.jpg"),
    ("loc1\\a.jpg", "loc1/a.jpg"),
])
def test_safe_names_are_normalised(name, expected):
    assert safe_relative_path(name) == expected


@pytest.mark.parametrize("name", [
    "../etc/passwd", "a/../../b.jpg", "a/..", "/etc/passwd", "C:/Windows/x.jpg", "c:x.jpg",
    "..\\..\\x.jpg", "", "   ", ".", "a\x00b.jpg",
])
def test_escaping_names_are_rejected(name):
    with pytest.raises(UnsafePathError):
        safe_relative_path(name)
