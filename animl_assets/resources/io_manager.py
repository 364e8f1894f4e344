"""The artifact IO manager: assets' values as plain files in the artifact store, every cross-export
materialization an immutable version.

Built on the project's Store (a local folder, or S3 through dagster-aws' boto3 client) rather than
``dg.UPathIOManager``: UPath reaches S3 through s3fs, whose aiobotocore pins botocore to a narrow range
(3.10 wants botocore < 1.43.118; dagster-aws here brings 1.44), and the Store already has the atomic
local writes, the truncation-safe S3 reads and the incremental upload the data half relies on.

Layout: an unpartitioned asset's value goes to ``<asset>/<version>/`` where the version is the content
hash of its files (``content_version``): a new materialization with other data is a new folder, never
an overwrite. A partitioned asset's value goes to ``<asset>/<partition folder>/``. Downstream loads the
version of the upstream's latest materialization (its ``version`` metadata), so what an asset read is
what Dagster records as its input's data version.
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from animl_assets.core.artifact_files import INDEX, content_version, from_files, to_files
from animl_assets.core.exports import partition_folder
from animl_assets.core.store import Store
from animl_assets.resources.storage import ArtifactStore, location

VERSION_METADATA = "version"


def version_folder(asset: str, version: str) -> str:
    """The folder of one version of a cross-export asset in the artifact store."""
    return f"{asset}/{version}"


def write_artifacts(store: Store, folder: str, files: dict[str, bytes]) -> None:
    """Write ``files`` below ``folder``; the index last, so a folder with an index is complete."""
    for name, data in sorted(files.items(), key=lambda item: item[0] == INDEX):
        store.write_bytes(f"{folder}/{name}", data)


def read_artifacts(store: Store, folder: str) -> Any:
    """The value stored below ``folder`` (see ``write_artifacts``)."""
    try:
        return from_files(lambda name: store.read_bytes(f"{folder}/{name}"))
    except FileNotFoundError as err:
        raise dg.Failure(f"no complete artifacts at {store.uri(folder)}: {err}") from err


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Stores assets' values as plain files (CSV, JSON, .npz; a dataclass as one file per field) in the
    artifact store; every materialization of a cross-export asset is a new immutable version."""

    storage: ArtifactStore

    def _folder(self, asset: str, partition: str | None, version: str | None) -> str:
        return f"{asset}/{partition_folder(partition)}" if partition else version_folder(asset, version or "")

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        asset = context.asset_key.to_python_identifier()
        files = to_files(obj, context.asset_key.path[-1])
        partition = context.asset_partition_key if context.has_asset_partitions else None
        version = content_version(files)
        folder = self._folder(asset, partition, version)
        store = self.storage.store()
        write_artifacts(store, folder, files)
        context.add_output_metadata({VERSION_METADATA: version, "artifacts": location(store.uri(folder))})

    def load_input(self, context: dg.InputContext) -> Any:
        asset = context.asset_key.to_python_identifier()
        store = self.storage.store()
        if context.has_asset_partitions and context.has_partition_key:  # the same export's value
            partition = context.asset_partition_key
            if not store.exists(f"{self._folder(asset, partition, None)}/{INDEX}"):
                name = context.asset_key.to_user_string()
                raise dg.Failure(f"{name} is not materialized for partition {partition!r}: materialize {name} first",
                                 allow_retries=False)
            return read_artifacts(store, self._folder(asset, partition, None))
        if context.has_asset_partitions:  # across exports: {partition: value} of those materialized so far
            folders = {p: self._folder(asset, p, None) for p in context.asset_partition_keys}
            return {p: read_artifacts(store, folder) for p, folder in folders.items()
                    if store.exists(f"{folder}/{INDEX}")}
        return read_artifacts(store, version_folder(asset, self.latest_version(context)))

    @staticmethod
    def latest_version(context: dg.InputContext) -> str:
        """The version of the upstream asset's latest materialization; a clear error when there is none."""
        event = context.instance.get_latest_materialization_event(context.asset_key)
        metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
        if VERSION_METADATA not in metadata:
            name = context.asset_key.to_user_string()
            raise dg.Failure(f"{name} is not materialized yet: materialize {name} first", allow_retries=False)
        return str(metadata[VERSION_METADATA].value)
