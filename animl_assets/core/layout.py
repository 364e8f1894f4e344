"""Where every artifact lives in the artifact store: one folder per export partition or per immutable
version of a cross-export asset, ``<asset>/<partition folder or version>/<file>``."""

from __future__ import annotations

import re

PARTITION_SEPARATOR = "~"  # not allowed in partition keys, so the folder name maps back to one partition
PARTITION_KEY = re.compile(r"^[A-Za-z0-9._\-/]+$")
TRAINING_FOLDER = "classifier_checkpoint/training"  # per-epoch checkpoints of unfinished trainings, by key


def partition_folder(partition_key: str) -> str:
    """The one folder name an export's artifacts live under: its partition key with '/' as '~'.

    One path component per partition, so no two partitions share a path (``a`` with image ``b/x.jpg`` and
    ``a/b`` with image ``x.jpg`` would, if the key's slashes were folders)."""
    if PARTITION_SEPARATOR in partition_key or not PARTITION_KEY.match(partition_key):
        raise ValueError(f"not a partition key: {partition_key!r}")
    return partition_key.replace("/", PARTITION_SEPARATOR)


def version_folder(asset: str, version: str) -> str:
    """The folder of one version of a cross-export asset."""
    return f"{asset}/{version}"


def asset_folder(asset: str, *, partition: str | None = None, version: str | None = None) -> str:
    """The folder of an asset's value: one export partition's, or one version's of a cross-export asset."""
    if partition is not None:
        return f"{asset}/{partition_folder(partition)}"
    if not version:
        raise ValueError(f"{asset}: a folder is one partition's or one version's")
    return version_folder(asset, version)


def artifact_key(asset: str, partition: str | None, name: str) -> str:
    """The key of artifact ``name`` of ``asset`` (below its partition's folder, when it is partitioned)."""
    return "/".join(part for part in (asset, partition and partition_folder(partition), name) if part)


def version_file(asset: str, version: str, name: str) -> str:
    """The key of file ``name`` in one version of a cross-export asset."""
    return f"{version_folder(asset, version)}/{name}"


def training_folder(key: str) -> str:
    """The folder of one training's per-epoch checkpoints (``key``: what the training learns from)."""
    return f"{TRAINING_FOLDER}/{key}"
