"""Relative paths taken from untrusted input (export file names, object keys)."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

_DRIVE = re.compile(r"^[A-Za-z]:")
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


def redact_credentials(text: str) -> str:
    """``text`` with the user and password of every URL in it replaced by ``***`` (for logs and metadata)."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


class UnsafePathError(ValueError):
    """A name that would land outside the folder it is meant for."""


def normalized_path(name: str) -> str:
    """``name`` as the POSIX path it is written under: backslashes as '/', empty and '.' parts dropped.
    Never raises (``safe_relative_path`` is the check); ``sub/x.jpg``, ``./sub/x.jpg`` and ``sub//x.jpg``
    are one file."""
    return "/".join(part for part in PurePosixPath(str(name).replace("\\", "/")).parts if part not in ("", ".", "/"))


def safe_relative_path(name: str) -> str:
    """Return ``name`` as a normalised POSIX relative path, or raise UnsafePathError.

    Rejects empty names, absolute paths, drive letters, backslash separators that hide ``..``,
    NUL bytes and any ``..`` component, so the result can be joined under a root safely.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnsafePathError(f"empty file name {name!r}")
    if "\x00" in name:
        raise UnsafePathError(f"file name {name!r} contains a NUL byte")
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise UnsafePathError(f"file name {name!r} is absolute; it must be relative to the images root")
    normalized = normalized_path(posix)
    if not normalized or ".." in normalized.split("/"):
        raise UnsafePathError(f"file name {name!r} escapes the images folder")
    return normalized


def is_under(location: str, root: str) -> bool:
    """Whether ``location`` (a local folder or ``s3://bucket/prefix``) lies at or below ``root``; local
    paths are compared after resolving links and ``..``."""
    if location.startswith("s3://") or root.startswith("s3://"):
        if not (location.startswith("s3://") and root.startswith("s3://")):
            return False
        bucket, _, prefix = location[5:].partition("/")
        root_bucket, _, root_prefix = root[5:].partition("/")
        prefix, root_prefix = prefix.strip("/"), root_prefix.strip("/")
        return bucket == root_bucket and (not root_prefix or prefix == root_prefix
                                          or prefix.startswith(root_prefix + "/"))
    return Path(location).resolve().is_relative_to(Path(root).resolve())
