"""Registering an export: put it into the exports location (with the MegaDetector results beside it) and add
its partition. Used by ``animl register``, the demo and the tests."""

from __future__ import annotations

import json
from pathlib import Path

from animl_assets.settings import Settings


class RegistrationError(ValueError):
    """An export that cannot be registered as asked; the message says why."""


def register_export(settings: Settings, path_or_uri: str, images_root: str | None = None,
                    name: str | None = None) -> str:
    """Put an export into the exports location (if it is not there already), with the MegaDetector results
    lying beside it (``<export>.md.json``), and add its partition. Returns the partition key."""
    import dagster as dg

    from animl_assets.assets import exports_partitions
    from animl_assets.core.ingest.cct import IMAGE_KEY_FIELDS, export_profile, load_cct
    from animl_assets.core.ingest.exports import export_key_for, mdcache_key_for, partition_key_for
    from animl_assets.resources import build_resources
    from animl_assets.resources.storage import read_uri

    exports_resource = build_resources(settings)["exports"]
    exports = exports_resource.store()
    exports_root = exports.uri().rstrip("/") + "/"
    source_uri = path_or_uri if path_or_uri.startswith("s3://") else str(Path(path_or_uri).expanduser().absolute())
    if source_uri.startswith(exports_root):
        if images_root or name:
            raise RegistrationError(f"--images-root and --name are for exports outside the exports location; this one "
                           f"is its partition {partition_key_for(source_uri[len(exports_root):])!r} already "
                           "(set ANIML_IMAGES_URI or the images asset's images_root config instead)")
        export_key = source_uri[len(exports_root):]
        partition = partition_key_for(export_key)
    else:
        folder, _, file_name = source_uri.rpartition("/")
        partition = partition_key_for(f"{name}.json" if name else file_name)
        export_key = export_key_for(partition)
        cct = load_cct(read_uri(source_uri, exports_resource.s3))
        profile = export_profile(cct)
        print(f"export profile: {profile} (images are read by their {IMAGE_KEY_FIELDS[profile]})")
        if not isinstance(cct.get("info"), dict):
            cct["info"] = {}
        root = images_root or ("" if settings.images_uri else folder)
        if root:
            cct["info"]["animl_images_root"] = root
        print(f"images under: {root}" if root else f"images under: {settings.images_uri} (ANIML_IMAGES_URI)")
        if profile == "animl" and not images_root and not settings.images_uri:
            print("  Animl keeps the images in its serving bucket: give --images-root, or set ANIML_IMAGES_URI "
                  "(e.g. s3://animl-images-serving-prod)")
        copies = {export_key: json.dumps(cct).encode()}
        try:
            copies[mdcache_key_for(export_key)] = read_uri(mdcache_key_for(source_uri), exports_resource.s3)
        except FileNotFoundError:
            pass
        for key, data in copies.items():
            if exports.exists(key) and exports.read_bytes(key) != data:
                raise RegistrationError(f"another export is already registered as {exports.uri(key)}: "
                               "choose another partition key with --name NAME")
        for key, data in copies.items():
            exports.write_bytes(key, data)
        if root:
            trust_images_root(settings, root)
        if len(copies) > 1:
            print(f"with the MegaDetector results beside it: {mdcache_key_for(source_uri)}")
    instance = dg.DagsterInstance.get()
    if not instance.has_dynamic_partition(exports_partitions.name, partition):
        instance.add_dynamic_partitions(exports_partitions.name, [partition])
    return partition


def trust_images_root(settings: Settings, root: str) -> None:
    """Record ``root`` as a place exports may read images from: the operator named it (see ImageSource)."""
    from animl_assets.resources.storage import REGISTERED_ROOTS

    path = settings.home / REGISTERED_ROOTS
    path.parent.mkdir(parents=True, exist_ok=True)
    if root not in (path.read_text().splitlines() if path.is_file() else []):
        with path.open("a") as handle:
            handle.write(root + "\n")
