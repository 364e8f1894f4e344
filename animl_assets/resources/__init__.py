"""Dagster resources: where artifacts, exports and images live."""

from animl_assets.resources.storage import LocalStore, S3Store, StoreResource, open_store

__all__ = ["LocalStore", "S3Store", "StoreResource", "open_store"]
