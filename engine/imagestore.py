"""The content-addressed image store: the primary image of each prompt, kept under the prompt's digest.

A small interface (`get`, `put`) so that the local directory used now can be swapped for an object store shared by
replicas. The PNG is written after its metadata and atomically, so its presence means the entry is complete.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine.errors import StorageError
from engine.files import write_atomic

DIGEST = re.compile(r"^[0-9a-f]{64}$")


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


class LocalImageStore:
    """`root/<first two hex>/<digest>.png` plus `<digest>.json` beside it."""

    def __init__(self, root: Path):
        self.root = root

    def _paths(self, digest: str) -> tuple[Path, Path]:
        if not is_digest(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
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
