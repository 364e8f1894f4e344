"""Stores for artifacts, exports and images: a local folder, or an S3 prefix through dagster-aws."""

import os
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Iterator
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
import boto3
from boto3.s3.transfer import TransferConfig
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from dagster_aws.s3 import S3Resource
from dagster_aws.utils import construct_boto_client_retry_config
from pydantic import Field
from urllib3.exceptions import ProtocolError

from animl_assets.core.artifact_files import INDEX, from_files
from animl_assets.core.ingest.exports import EXPORT_SUFFIX
from animl_assets.core.layout import asset_folder
from animl_assets.core.paths import redact_credentials
from animl_assets.core.store import LocalStore, Store, StoredFile, join_key
from animl_assets.core.transfers import TRANSFER_WORKERS
from animl_assets.settings import describe

MULTIPART_BYTES = 8 << 20

# A response cut short, a connection dropped or refused, a read timing out: worth another try.
TRANSIENT_ERRORS = (IncompleteReadError, ResponseStreamingError, ProtocolError, ConnectionClosedError,
                    EndpointConnectionError, ReadTimeoutError, ConnectionError)


class S3Store:
    """Objects below ``s3://bucket/prefix``; a PUT is atomic, so writes need no staging."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", attempts: int = 4, backoff_s: float = 0.25) -> None:
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")
        self.attempts, self.backoff_s = attempts, backoff_s

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes. A body cut short or a dropped connection is retried (``attempts`` in all,
        with backoff) and the length checked: botocore retries the request, not the body's download."""
        return self._get(key)

    def read_start(self, key: str, length: int) -> bytes:
        """The object's first ``length`` bytes (one ranged GET), retried as ``read_bytes`` is."""
        return self._get(key, f"bytes=0-{max(0, length - 1)}")

    def _get(self, key: str, byte_range: str = "") -> bytes:
        for attempt in range(1, self.attempts + 1):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                                  **({"Range": byte_range} if byte_range else {}))
                data = response["Body"].read()
                if len(data) != response["ContentLength"]:
                    raise IncompleteReadError(actual_bytes=len(data), expected_bytes=response["ContentLength"])
                return data
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    raise FileNotFoundError(f"no object at {self.uri(key)}") from err
                raise
            except TRANSIENT_ERRORS:
                if attempt == self.attempts:
                    raise
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """One PUT from the open file for a small file (a crop); past ``MULTIPART_BYTES``, boto3's managed
        transfer in parts (each retried). Either way the object appears only when whole."""
        if os.path.getsize(path) <= MULTIPART_BYTES:
            with open(path, "rb") as body:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body)
        else:
            self.client.upload_file(str(path), self.bucket, self._key(key),
                                    Config=TransferConfig(multipart_threshold=MULTIPART_BYTES))

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def stat(self, key: str) -> StoredFile | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return StoredFile(key, head["ContentLength"], head["LastModified"].timestamp())

    def list(self, prefix: str = "", *, suffix: str = "", max_depth: int | None = None) -> Iterator[StoredFile]:
        full = self._key(prefix)
        start = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        folders = [(f"{full}/" if full else "", 0)]
        while folders:  # page by page; with max_depth, folder by folder ("/" delimiter), never deeper
            folder, depth = folders.pop()
            options = {} if max_depth is None else {"Delimiter": "/"}
            for page in paginator.paginate(Bucket=self.bucket, Prefix=folder, **options):
                for item in page.get("Contents", []):
                    if item["Key"].endswith(suffix):
                        yield StoredFile(item["Key"][start:], item["Size"], item["LastModified"].timestamp(),
                                         item.get("ETag", "").strip('"'))
                if max_depth is not None and depth < max_depth:
                    folders += [(common["Prefix"], depth + 1) for common in page.get("CommonPrefixes", [])]

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def child(self, prefix: str) -> "S3Store":
        return S3Store(self.client, self.bucket, self._key(prefix), self.attempts, self.backoff_s)


def disable_signing(*_args: Any, **_kwargs: Any) -> Any:
    """botocore's choose-signer hook for public buckets: no signature."""
    return UNSIGNED


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def location(uri: str) -> dg.MetadataValue:
    """Where an artifact is, for metadata: a path for a local file, a URL for an object store."""
    return dg.MetadataValue.url(uri) if "://" in uri else dg.MetadataValue.path(uri)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into bucket and prefix; a query, fragment or credentials are refused
    (they would otherwise become part of object keys, or leak into logs)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {redact_credentials(uri)!r}")
    if "?" in uri or "#" in uri:
        raise ValueError(f"s3 URI {redact_credentials(uri)!r} has a query or fragment: name a bucket and prefix only")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not _BUCKET.match(bucket):
        raise ValueError(f"s3 URI {redact_credentials(uri)!r} does not name a valid bucket")
    return bucket, prefix.strip("/")


# botocore event hooks every client this module makes is given: (event name, handler). Instrumentation, such
# as S3Requests below, registers here; the platform itself adds none.
S3_CLIENT_HOOKS: list[tuple[str, Any]] = []


class S3Requests:
    """Counts the S3 requests of every client made while it is active (``with S3Requests() as requests``)
    through botocore's event hooks: ``calls[(operation, bucket/prefix)]`` (a ranged GET is "GetObject(ranged)"),
    and the bytes got and put per bucket/prefix. ``prefix_depth`` path parts of each key are kept."""

    def __init__(self, prefix_depth: int = 1) -> None:
        self.prefix_depth = prefix_depth
        self.calls: Counter = Counter()
        self.bytes_got: Counter = Counter()
        self.bytes_put: Counter = Counter()
        self.lock = threading.Lock()

    def _where(self, params: dict) -> str:
        key = str(params.get("Key") or params.get("Prefix") or "")
        return "/".join([str(params.get("Bucket", "")), *key.split("/")[: self.prefix_depth]])

    def _before(self, params: dict, model: Any, context: dict, **_: Any) -> None:
        name = model.name + ("(ranged)" if model.name == "GetObject" and params.get("Range") else "")
        context["animl_where"] = self._where(params)
        with self.lock:
            self.calls[(name, self._where(params))] += 1
            if model.name in ("PutObject", "UploadPart"):
                self.bytes_put[self._where(params)] += _remaining(params.get("Body"))

    def _after(self, parsed: dict, context: dict, **_: Any) -> None:
        with self.lock:
            self.bytes_got[context.get("animl_where", "")] += int(parsed.get("ContentLength") or 0)

    def count(self, operation: str, where: str = "") -> int:
        """Requests of ``operation`` under ``where`` (a bucket, or bucket/prefix)."""
        return sum(n for (name, place), n in self.calls.items() if name == operation and place.startswith(where))

    def __enter__(self) -> "S3Requests":
        S3_CLIENT_HOOKS.extend([("before-parameter-build.s3", self._before), ("after-call.s3.GetObject", self._after)])
        return self

    def __exit__(self, *_: Any) -> None:
        for hook in [("before-parameter-build.s3", self._before), ("after-call.s3.GetObject", self._after)]:
            S3_CLIENT_HOOKS.remove(hook)


def _remaining(body: Any) -> int:
    """The bytes left to send in a request body (bytes, or a seekable file at its current position)."""
    if isinstance(body, (bytes, bytearray)):
        return len(body)
    if hasattr(body, "seek") and hasattr(body, "tell"):
        here = body.tell()
        end = body.seek(0, os.SEEK_END)
        body.seek(here)
        return end - here
    return 0


def s3_client(s3: S3Resource | None = None) -> Any:
    """A boto3 S3 client configured by ``s3`` as dagster-aws configures one, its connection pool sized to the
    transfer pool (``TRANSFER_WORKERS`` requests in flight, see ``core.transfers``) and its endpoint stripped
    of any ``user:password@`` (S3 signs with access keys, never URL credentials, and botocore puts the endpoint
    in its error messages)."""
    s3 = s3 or S3Resource()
    endpoint = s3.endpoint_url
    if endpoint:
        parts = urlsplit(endpoint)
        endpoint = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    config = construct_boto_client_retry_config(s3.max_attempts).merge(
        BotoConfig(max_pool_connections=TRANSFER_WORKERS + 4))  # + 4: a manifest or journal write beside the pool
    client = boto3.session.Session(profile_name=s3.profile_name).client(
        "s3", region_name=s3.region_name, use_ssl=s3.use_ssl, verify=s3.verify, endpoint_url=endpoint,
        aws_access_key_id=s3.aws_access_key_id, aws_secret_access_key=s3.aws_secret_access_key,
        aws_session_token=s3.aws_session_token, config=config)
    if s3.use_unsigned_session:
        client.meta.events.register("choose-signer.s3.*", disable_signing)
    for event, handler in S3_CLIENT_HOOKS:
        client.meta.events.register(event, handler)
    return client


def open_store(uri: str, s3: S3Resource | None = None) -> Store:
    """A store for a local path or an ``s3://bucket/prefix`` URI."""
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        return S3Store(s3_client(s3), bucket, prefix)
    return LocalStore(uri)


def read_uri(uri: str, s3: S3Resource | None = None) -> bytes:
    """The bytes of one file named by a local path or an ``s3://bucket/key`` URI."""
    if uri.startswith("s3://"):
        folder, _, name = uri.rpartition("/")
        return open_store(folder, s3).read_bytes(name)
    path = Path(uri).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    return path.read_bytes()


class StoreResource(dg.ConfigurableResource):
    """A place for files: a local folder, or ``s3://bucket/prefix`` reached through dagster-aws."""

    default_folder: ClassVar[str] = ""
    uri: str = Field(default="", description="Local folder or s3://bucket/prefix. Empty: the resource's default "
                                             "folder under home.")
    home: str = Field(default=".animl", description=describe("storage", "home"))
    s3: S3Resource | None = None

    @property
    def location(self) -> str:
        """Where the files are: ``uri``, else the default folder under ``home`` (empty when it has none)."""
        if self.uri or not self.default_folder:
            return self.uri
        return str(Path(self.home).expanduser().absolute() / self.default_folder)

    def store(self) -> Store:
        return open_store(self.location, self.s3)

    def cache(self, *parts: str) -> Path:
        """A local working folder for stages that need files on disk when the store is remote."""
        return Path(self.home).expanduser().absolute().joinpath("cache", *parts)


class ArtifactStore(StoreResource):
    """Where every asset writes its artifacts (ANIML_STORAGE_URI; default $ANIML_HOME/artifacts): plain JSON,
    CSV and JPEG files under <asset>/<partition>/ or <asset>/<version>/. An asset's value (what the IO manager
    stores) is read back through ``load`` only, by the IO manager and by assets that read a named version."""

    default_folder: ClassVar[str] = "artifacts"

    def save(self, files: dict[str, bytes], asset: str, *, partition: str | None = None,
             version: str | None = None) -> str:
        """Write a value's files; the index last, so a folder with an index is complete. Returns its URI."""
        store, folder = self.store(), asset_folder(asset, partition=partition, version=version)
        for name, data in sorted(files.items(), key=lambda item: item[0] == INDEX):
            store.write_bytes(f"{folder}/{name}", data)
        return store.uri(folder)

    def has(self, asset: str, *, partition: str | None = None, version: str | None = None) -> bool:
        """Whether a complete value of ``asset`` (one partition's, or one version's) is stored."""
        return self.store().exists(f"{asset_folder(asset, partition=partition, version=version)}/{INDEX}")

    def load(self, asset: str, *, partition: str | None = None, version: str | None = None,
             expected: type | None = None) -> Any:
        """The value ``asset`` stored for one partition, or one version of a cross-export asset (a record stored
        as a plain dict loads as ``expected``, see ``JsonRecord``)."""
        store, folder = self.store(), asset_folder(asset, partition=partition, version=version)
        try:
            return from_files(lambda name: store.read_bytes(f"{folder}/{name}"), expected)
        except FileNotFoundError as err:
            raise dg.Failure(f"no complete artifacts at {store.uri(folder)}: {err}") from err


class ExportsLocation(StoreResource):
    """Where COCO Camera Traps exports are dropped (ANIML_EXPORTS_URI; default $ANIML_HOME/exports); the
    new_exports sensor watches it, and each export file is a partition."""

    default_folder: ClassVar[str] = "exports"
    max_depth: int = Field(default=1, ge=0, description=describe("exports", "max_depth") + " 1: the top "
                           "and one sub-folder. Deeper folders, such as the image folders beside an export, are "
                           "never listed.")

    def list_exports(self) -> Iterator[StoredFile]:
        """The JSON files an export (or its MegaDetector results) may be, page by page."""
        return self.store().list(suffix=EXPORT_SUFFIX, max_depth=self.max_depth)


class ImageSource(StoreResource):
    """Where exports' image keys are resolved when neither the run config nor the export names a root
    (ANIML_IMAGES_URI, e.g. Animl's serving bucket). Empty: the export's own folder. An images root that
    an export names itself must lie under an allowed root (ANIML_ALLOWED_IMAGE_ROOTS)."""

    allowed_roots: str = Field(default="", description=describe("image_source", "allowed_roots"))

    def allowed(self, export_folder: str) -> list[str]:
        """Every root an export in ``export_folder`` may read its images from."""
        registered = Path(self.home).expanduser().absolute() / REGISTERED_ROOTS
        roots = [export_folder, self.location, *self.allowed_roots.split(",")]
        if registered.is_file():
            roots += registered.read_text().splitlines()
        return [root.strip() for root in roots if root.strip()]


REGISTERED_ROOTS = "registered_image_roots.txt"  # under ANIML_HOME: the roots an operator gave `animl register`
