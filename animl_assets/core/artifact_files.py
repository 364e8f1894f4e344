"""Values as plain, readable files, and back: what the artifact IO manager stores. Never pickles.

A DataFrame is a CSV (gzipped when its file name ends in ``.gz``), a dict or list a JSON file, arrays an
``.npz``, raw bytes (``Blob``, e.g. a TorchScript model) the file itself, a ``TorchFile`` (a checkpoint) a
``torch.save`` file; a dataclass of such values (an "artifact set", e.g. a dataset's CSV and label index,
or a checkpoint beside its ``params.json`` and ``label_index.json``) is one file per field, named by the
field's ``file`` metadata. ``artifacts.json``, written last, says what the folder holds and how to load it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import sys
import zipfile
from typing import Any

import numpy as np
import pandas as pd

from animl_assets.core.tables import read_csv

INDEX = "artifacts.json"


class Arrays(dict):
    """Named numpy arrays, stored together as one ``.npz`` (e.g. a confusion matrix per split)."""


class JsonRecord:
    """Base of a dataclass stored as one JSON file (a small asset value: a registered version, a champion, an
    export's classifications): typed in code, the same file and version as the plain dict it replaced, and
    read back as its class; such a dict stored before the class existed loads into it (``from_files``'s
    ``expected``)."""


class Blob(bytes):
    """A file's bytes stored as they are (e.g. a TorchScript model)."""


class TorchFile(dict):
    """Tensors and plain values (a checkpoint: ``{"epoch", "model": state_dict, "optimizer", …}``) stored
    with ``torch.save`` as one ``.pt``, the reference scripts' format; loaded with ``weights_only=True``, so
    loading never runs pickled code."""


def torch_bytes(state: dict[str, Any]) -> bytes:
    """``state`` as the bytes ``torch.save`` writes (a checkpoint file)."""
    import torch

    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


# what ``read_checkpoint`` raises for bytes that are not a (whole) checkpoint: truncated, another format, junk
NOT_A_CHECKPOINT = (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile)


def read_checkpoint(data: bytes | str | os.PathLike[str]) -> dict[str, Any]:
    """A ``torch.save`` file (a checkpoint) from bytes or a path, loaded without running pickled code
    (``NOT_A_CHECKPOINT`` when the bytes are not one)."""
    import torch

    return torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, map_location="cpu", weights_only=True)


def artifact_file(name: str, keep_text: bool = False) -> dict[str, Any]:
    """Field metadata naming the file a field of an artifact-set dataclass is stored as. ``keep_text``: a table
    whose text columns read back as the text written (``01`` stays ``01``, not the number 1)."""
    return {"file": name, **({"keep_text": True} if keep_text else {})}


def artifact_files(pattern: str) -> dict[str, str]:
    """Field metadata for a field holding ``{key: value}``, each value stored as its own file named
    ``pattern.format(key)`` (e.g. one ``label_index_{}.json`` per extra output); an empty dict writes no file."""
    return {"files": pattern}


def _dump(value: Any) -> tuple[str, bytes]:
    if isinstance(value, Blob):
        return "bytes", bytes(value)
    if isinstance(value, TorchFile):
        return "pt", torch_bytes(value)
    if isinstance(value, pd.DataFrame):
        return "csv", value.to_csv(index=False).encode()
    if isinstance(value, (Arrays, np.ndarray)):
        buffer = io.BytesIO()
        np.savez(buffer, **(value if isinstance(value, Arrays) else {"array": value}))
        return "npz", buffer.getvalue()
    if isinstance(value, (dict, list)):
        return "json", json.dumps(value, indent=1).encode()
    raise TypeError(f"no plain-file format for {type(value).__name__}: use a DataFrame, dict, list, numpy "
                    "arrays or a dataclass of them")


def _load(kind: str, data: bytes, text: tuple[str, ...] = ()) -> Any:
    if kind == "bytes":
        return Blob(data)
    if kind == "pt":
        return TorchFile(read_checkpoint(data))
    if kind == "csv":
        return read_csv(data, text)
    if kind == "json":
        return json.loads(data)
    if kind in ("npz", "ndarray"):
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            loaded = Arrays({name: arrays[name] for name in arrays.files})
        return loaded["array"] if kind == "ndarray" else loaded
    raise ValueError(f"unknown artifact kind {kind!r}")


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _loaded(name: str) -> Any:
    module, _, qualname = name.partition(":")
    return getattr(sys.modules.get(module), qualname, None)  # never imports: only classes already loaded


def _record_class(name: str | None, expected: type | None) -> type | None:
    """The JsonRecord class a JSON value loads as: the one its index names when that is loaded, else
    ``expected``; None (a plain mapping) when neither is a record class."""
    for cls in (_loaded(name) if name else None, expected):
        if isinstance(cls, type) and issubclass(cls, JsonRecord) and dataclasses.is_dataclass(cls):
            return cls
    return None


def to_files(value: Any, name: str) -> dict[str, bytes]:
    """The files that hold ``value`` (``name`` names a single value's file), with ``artifacts.json``."""
    if isinstance(value, JsonRecord):
        file = f"{name}.json"
        index = {"class": _class_name(type(value)), "record": True, "files": {"": {"file": file, "kind": "json"}}}
        return {file: _dump(dataclasses.asdict(value))[1], INDEX: json.dumps(index, indent=1).encode()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        files, index = {}, {"class": _class_name(type(value)), "files": {}}
        for field in dataclasses.fields(value):
            if "files" in field.metadata:
                entries = _file_set(getattr(value, field.name), field.metadata["files"])
                files |= {file: data for file, (_, data) in entries.items()}
                index["files"][field.name] = {"set": {file: kind for file, (kind, _) in entries.items()},
                                              "pattern": field.metadata["files"]}
                continue
            if _left_out(value, field):
                continue
            kind, data = _dump(getattr(value, field.name))
            file = field.metadata.get("file", f"{field.name}.{kind}")
            files[file] = gzip.compress(data, mtime=0) if file.endswith(".gz") else data
            index["files"][field.name] = {"file": file, "kind": _kind(getattr(value, field.name), kind),
                                          **_text_columns(getattr(value, field.name), field)}
    else:
        kind, data = _dump(value)
        files = {f"{name}.{kind}": data}
        index = {"files": {"": {"file": f"{name}.{kind}", "kind": _kind(value, kind)}}}
    return files | {INDEX: json.dumps(index, indent=1).encode()}


def _file_set(values: dict[str, Any], pattern: str) -> dict[str, tuple[str, bytes]]:
    """``{file: (kind, bytes)}`` of a field stored a file per key."""
    entries = {}
    for key, item in values.items():
        kind, data = _dump(item)
        file = pattern.format(key)
        entries[file] = (_kind(item, kind), gzip.compress(data, mtime=0) if file.endswith(".gz") else data)
    return entries


def _read_file_set(entry: dict[str, Any], read: Any) -> dict[str, Any]:
    """The ``{key: value}`` a field stored a file per key holds, keys recovered through its file name pattern."""
    prefix, _, suffix = entry["pattern"].partition("{}")
    return {file[len(prefix):len(file) - len(suffix)]: _load(kind, _unzipped(file, read(file)))
            for file, kind in entry["set"].items()}


def _text_columns(value: Any, field: dataclasses.Field) -> dict[str, list[str]]:
    """The index's record of a ``keep_text`` table's text columns, which loading reads as text."""
    if not (field.metadata.get("keep_text") and isinstance(value, pd.DataFrame)):
        return {}
    return {"text": [str(c) for c in value.columns
                     if pd.api.types.is_object_dtype(value[c]) or pd.api.types.is_string_dtype(value[c])]}


def _left_out(value: Any, field: dataclasses.Field) -> bool:
    """An empty ``Blob`` whose field defaults to one (a file not made, e.g. an ONNX model not exported) is
    not written: loading gives the default back."""
    return isinstance(getattr(value, field.name), Blob) and not getattr(value, field.name) \
        and field.default is not dataclasses.MISSING


def _kind(value: Any, kind: str) -> str:
    return "ndarray" if isinstance(value, np.ndarray) else kind


def listed_files(index: dict[str, Any]) -> list[str]:
    """Every file an ``artifacts.json`` index lists (a field stored a file per key lists each)."""
    return [file for entry in index["files"].values() for file in (entry["set"] if "set" in entry else [entry["file"]])]


def from_files(read: Any, expected: type | None = None) -> Any:
    """The value ``to_files`` stored; ``read(file_name) -> bytes`` reads a file of its folder. A record loads
    as its class (plain JSON when that class is not loaded here); a JSON mapping stored without a class loads
    as ``expected`` when that is a ``JsonRecord`` class."""
    index = json.loads(read(INDEX))
    if "class" not in index or index.get("record"):
        entry = index["files"][""]
        value = _load(entry["kind"], read(entry["file"]))
        record = _record_class(index.get("class"), expected)
        return record(**value) if record and isinstance(value, dict) else value
    cls = _loaded(index["class"])
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"refusing to load an artifact set of class {index['class']!r}: not a loaded dataclass")
    return cls(**{field: _read_file_set(entry, read) if "set" in entry
                  else _load(entry["kind"], _unzipped(entry["file"], read(entry["file"])), tuple(entry.get("text", ())))
                  for field, entry in index["files"].items()})


def _unzipped(file: str, data: bytes) -> bytes:
    return gzip.decompress(data) if file.endswith(".gz") else data


def content_version(files: dict[str, bytes]) -> str:
    """A short content hash of a set of files: the same files, the same version."""
    digest = hashlib.sha256()
    for name in sorted(files):
        if name != INDEX:
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()[:16]


def config_key(settings: Any) -> str:
    """A short hash of JSON-able ``settings`` (keys sorted): the same settings, the same key."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def value_version(value: Any, name: str) -> str:
    """The version the files of ``value`` would have: what the IO manager names its folder by, and the
    asset's data version."""
    return content_version(to_files(value, name))
