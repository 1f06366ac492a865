"""The shared copy of the files output nodes write, so `/view` answers from any replica.

SaveImage and PreviewImage write `output/` and `temp/` files on the replica that ran the prompt; the `/view` URL
in the answer may reach another replica behind the load balancer. With a shared store configured
(`settings.store_url`), each written file is also published as `<prefix>/files/<type>/<subfolder>/<filename>`, and
`/view` falls back to it when the local folder lacks the file. Without one (the default) nothing is mirrored.

Names are ComfyUI's numbered `<stem>_<number>_.png`, numbered per replica; two replicas could pick the same number
for different images. Publishing is therefore create-only (a conditional PUT, `If-None-Match: *`): the writer that
loses takes the next free number, so one name never stands for two images.
"""
from __future__ import annotations

import posixpath
import re
from typing import TYPE_CHECKING, Any, Protocol

from engine.imagestore import S3_ERRORS, S3Location, s3_client, s3_error_code, s3_storage_error

if TYPE_CHECKING:
    from engine.settings import Settings

KINDS = ("output", "temp", "input")
TAKEN = ("PreconditionFailed", "ConditionalRequestConflict")  # the key exists, or another create-only PUT won


class OutputStore(Protocol):
    def publish(self, kind: str, subfolder: str, filename: str, data: bytes) -> bool:
        """Store a new file; False (nothing written) when that name is already taken."""
        ...

    def fetch(self, kind: str, subfolder: str, filename: str) -> bytes | None:
        """The file's bytes, or None when the store has no such file."""
        ...

    def highest_number(self, kind: str, subfolder: str, stem: str) -> int:
        """The largest N of the stored `<stem>_<N>_.png` files in that folder (0 when none)."""
        ...


def relative_key(kind: str, subfolder: str, filename: str) -> str:
    """`<kind>/<subfolder>/<filename>` with `/` separators; refuses anything that would leave its folder."""
    if kind not in KINDS:
        raise ValueError(f"unknown folder type {kind!r}")
    parts = [p for p in subfolder.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or not filename or "/" in filename or "\\" in filename or filename in (".", ".."):
        raise ValueError(f"not a plain relative file name: {subfolder!r}/{filename!r}")
    return posixpath.join(kind, *parts, filename)


class S3OutputStore:
    def __init__(self, client: Any, location: S3Location):
        self.client = client
        self.location = location

    def _key(self, kind: str, subfolder: str, filename: str) -> str:
        return self.location.key("files", relative_key(kind, subfolder, filename))

    def publish(self, kind: str, subfolder: str, filename: str, data: bytes) -> bool:
        key = self._key(kind, subfolder, filename)
        try:
            self.client.put_object(Bucket=self.location.bucket, Key=key, Body=data, IfNoneMatch="*",
                                   ContentType="image/png" if filename.lower().endswith(".png") else
                                   "application/octet-stream")
        except S3_ERRORS as exc:
            if s3_error_code(exc) in TAKEN:
                return False
            raise s3_storage_error(exc, f"store {filename}") from exc
        return True

    def fetch(self, kind: str, subfolder: str, filename: str) -> bytes | None:
        key = self._key(kind, subfolder, filename)
        try:
            return self.client.get_object(Bucket=self.location.bucket, Key=key)["Body"].read()
        except S3_ERRORS as exc:
            if s3_error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise s3_storage_error(exc, f"read {filename}") from exc

    def highest_number(self, kind: str, subfolder: str, stem: str) -> int:
        folder = self._key(kind, subfolder, "x")[:-1]  # the folder's key prefix, ending in "/"
        pattern = re.compile(re.escape(folder + stem) + r"_(\d+)_")  # any extension counts, as in ComfyUI
        highest = 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket,
                                                                          Prefix=f"{folder}{stem}_")
            for page in pages:
                for item in page.get("Contents", []):
                    match = pattern.match(item["Key"])
                    if match:
                        highest = max(highest, int(match.group(1)))
        except S3_ERRORS as exc:
            raise s3_storage_error(exc, f"list the files of {stem}") from exc
        return highest


def output_store_from_settings(settings: Settings) -> OutputStore | None:
    """None (files stay local) unless a shared store is configured."""
    if not settings.store_url:
        return None
    return S3OutputStore(s3_client(settings.s3_endpoint), S3Location.parse(settings.store_url))
