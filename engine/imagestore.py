"""The content-addressed image store: the primary image of each prompt, kept under the prompt's digest.

A small interface (`get`, `put`) with two backends, chosen by `settings.store_url`:
- `LocalImageStore`, the default: the data directory. The PNG is written after its metadata and atomically, so
  its presence means the entry is complete.
- `S3ImageStore`, for replicas behind a load balancer: one object per digest in an S3-compatible bucket, the
  metadata carried in the object's own user metadata. An S3 PUT is atomic per object, so a reader sees the whole
  entry (image and metadata together) or nothing; there is no moment with one half present.

boto3 is the S3 client: the reference client, maintained with the service, with SigV4 signing, retries with
backoff, path-style addressing for self-hosted stores, and the full AWS credential chain (the `AWS_*` variables,
shared config files, and the web-identity tokens that Kubernetes service accounts get on EKS), which a deployment
needs more than a smaller client's fewer dependencies. It is imported only when an S3 store is configured.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError

from engine.errors import StorageError
from engine.files import write_atomic

if TYPE_CHECKING:
    from engine.settings import Settings

DIGEST = re.compile(r"^[0-9a-f]{64}$")
META_KEY = "comfy-meta"  # user metadata key (sent as x-amz-meta-comfy-meta) holding StoredImage.meta as JSON
MAX_META_BYTES = 1800  # S3 allows 2 KiB of user metadata per object, keys included


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    meta: dict[str, Any] = field(default_factory=dict)  # filename, subfolder, type of the file /view serves

    @property
    def filename(self) -> str:
        return self.meta.get("filename", "image.png")


class ImageStore(Protocol):
    def get(self, digest: str) -> StoredImage | None: ...

    def put(self, digest: str, image: StoredImage) -> None: ...


def is_digest(text: str) -> bool:
    return bool(DIGEST.match(text))


def _check_digest(digest: str) -> None:
    if not is_digest(digest):
        raise ValueError(f"not a sha256 hex digest: {digest!r}")


class LocalImageStore:
    """`root/<first two hex>/<digest>.png` plus `<digest>.json` beside it."""

    def __init__(self, root: Path):
        self.root = root

    def _paths(self, digest: str) -> tuple[Path, Path]:
        _check_digest(digest)
        folder = self.root / digest[:2]
        return folder / f"{digest}.png", folder / f"{digest}.json"

    def get(self, digest: str) -> StoredImage | None:
        png, meta = self._paths(digest)
        try:
            data = png.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"could not read stored image {digest}: {exc.strerror}", exc.errno) from exc
        try:
            info = json.loads(meta.read_bytes())
        except (OSError, ValueError):
            info = {}
        return StoredImage(data, info)

    def put(self, digest: str, image: StoredImage) -> None:
        png, meta = self._paths(digest)
        write_atomic(meta, json.dumps(image.meta).encode())
        write_atomic(png, image.data)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without leading or trailing slash; may be empty

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """`s3://bucket/some/prefix` -> S3Location("bucket", "some/prefix")."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"the store URL must look like s3://bucket/prefix, got {url!r}")
        return cls(parts.netloc, parts.path.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)


def s3_client(endpoint: str = "") -> Any:
    """A thread-safe boto3 S3 client: credentials and region from the usual AWS chain (`AWS_ACCESS_KEY_ID`,
    `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_DEFAULT_REGION`, profiles, web identity)."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    config = Config(
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=32,
        # self-hosted stores (MinIO, SeaweedFS, Ceph) serve buckets by path, not by host name
        s3={"addressing_style": "path" if endpoint else "auto"},
        # checksums only where the API requires them: several S3-compatible stores reject the newer defaults
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return session.client("s3", endpoint_url=endpoint or None, region_name=session.region_name or "us-east-1",
                          config=config)


S3_ERRORS = (BotoCoreError, ClientError)  # what a call may raise: an answer of the store, or no answer


def s3_error_code(exc: Exception) -> str:
    """The S3 error code of an answer ("NoSuchKey", "PreconditionFailed", ...); "" when there was no answer."""
    return str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, ClientError) else ""


def s3_storage_error(exc: Exception, what: str) -> StorageError:
    return StorageError(f"the shared store could not {what}: {exc}")


class S3ImageStore:
    """`<prefix>/images/<digest>.png` in a bucket; the metadata rides on the object, so one PUT publishes both."""

    def __init__(self, client: Any, location: S3Location):
        self.client = client
        self.location = location

    def _key(self, digest: str) -> str:
        _check_digest(digest)
        return self.location.key("images", f"{digest}.png")

    def get(self, digest: str) -> StoredImage | None:
        key = self._key(digest)
        try:
            response = self.client.get_object(Bucket=self.location.bucket, Key=key)
            data = response["Body"].read()
        except S3_ERRORS as exc:
            if s3_error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise s3_storage_error(exc, f"read stored image {digest}") from exc
        try:
            meta = json.loads(response.get("Metadata", {}).get(META_KEY, "{}"))
        except ValueError:
            meta = {}
        return StoredImage(data, meta if isinstance(meta, dict) else {})

    def put(self, digest: str, image: StoredImage) -> None:
        key = self._key(digest)
        meta = json.dumps(image.meta, separators=(",", ":"))  # ensure_ascii: header values must be ASCII
        if len(meta) > MAX_META_BYTES:
            raise StorageError(f"the metadata of {image.filename!r} is larger than S3 allows ({len(meta)} bytes)")
        try:
            self.client.put_object(Bucket=self.location.bucket, Key=key, Body=image.data, ContentType="image/png",
                                   Metadata={META_KEY: meta})
        except S3_ERRORS as exc:
            raise s3_storage_error(exc, f"store image {digest}") from exc


def image_store_from_settings(settings: Settings) -> ImageStore:
    """The local directory by default; an S3-compatible bucket when `store_url` is set."""
    if not settings.store_url:
        return LocalImageStore(settings.images_dir)
    return S3ImageStore(s3_client(settings.s3_endpoint), S3Location.parse(settings.store_url))
