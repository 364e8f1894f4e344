"""Thin asset definitions, one module per stage."""

from animl_assets.assets.exports import cct_export, exports_partitions, make_new_exports_sensor
from animl_assets.assets.images import images

PER_EXPORT_ASSETS = [cct_export, images]

__all__ = ["PER_EXPORT_ASSETS", "cct_export", "exports_partitions", "images", "make_new_exports_sensor"]
