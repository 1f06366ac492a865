"""Atomic file writes: a reader sees either the whole file or none, and a failed write leaves nothing behind.

Data goes to a hidden temporary file in the destination folder, then is renamed into place (or hard-linked, when
an existing file must never be replaced). OS errors become `StorageError` so the caller can answer 507.
"""
from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Callable

from engine.errors import StorageError


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path`, replacing any existing file atomically."""
    _write_then(path, data, lambda tmp: os.replace(tmp, path))


def create_new(path: Path, data: bytes) -> bool:
    """Write `data` to `path` only if nothing is there; False when a file already exists (nothing written)."""
    created = True

    def link(tmp: Path) -> None:
        nonlocal created
        try:
            os.link(tmp, path)
        except FileExistsError:
            created = False
        finally:
            tmp.unlink(missing_ok=True)

    _write_then(path, data, link)
    return created


def _write_then(path: Path, data: bytes, publish: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        publish(tmp)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(exc, path) from exc


def storage_error(exc: OSError, path: Path) -> StorageError:
    reason = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EFBIG: "the file is larger than the file system allows",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return StorageError(f"could not write {path.name}: {reason}", exc.errno)
