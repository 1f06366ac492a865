"""Atomic file writes: a reader sees either the whole file or none, and a failed write leaves nothing behind.

Data goes to a hidden temporary file in the destination folder, then is renamed into place (or hard-linked, when
an existing file must never be replaced). OS errors become `StorageError` so the caller can answer 507.
"""
from __future__ import annotations

import errno
import os
import secrets
import threading
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


class FileNumbers:
    """The next free number of ComfyUI's `<stem>_<number>_.png` names, per folder and stem.

    ComfyUI scans the folder on every save, which grows with the folder. Here a folder is scanned again only when
    its modification time differs from the one seen after our own last write, i.e. when someone else added or
    removed files. A number another writer takes in between is harmless: `create_new` never replaces a file and
    the caller moves on to the next number."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], tuple[int, int]] = {}  # (folder, stem) -> (next number, folder mtime)
        self._lock = threading.Lock()

    def take(self, folder: Path, stem: str, count: int = 1) -> int:
        """Reserve `count` consecutive numbers and return the first."""
        key = (str(folder), stem.lower())
        with self._lock:
            known = self._known.get(key)
            if known is None or known[1] != _mtime(folder):
                known = (highest_number(folder, stem) + 1, 0)
            self._known[key] = (known[0] + count, known[1])
            return known[0]

    def written(self, folder: Path, stem: str, last: int) -> None:
        """Record our own write of number `last`, so that it does not count as someone else's change."""
        key = (str(folder), stem.lower())
        with self._lock:
            self._known[key] = (max(self._known.get(key, (0, 0))[0], last + 1), _mtime(folder))


def _mtime(folder: Path) -> int:
    try:
        return folder.stat().st_mtime_ns
    except FileNotFoundError:
        return -1


def highest_number(folder: Path, stem: str) -> int:
    """The highest `<stem>_<number>_` in the folder, 0 when there is none (ComfyUI's numbering)."""
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return 0
    start, highest = stem.lower() + "_", 0
    for entry in entries:
        if entry.lower().startswith(start):  # any extension counts, as in ComfyUI
            digits = entry[len(start):].split("_")[0]
            if digits.isdigit():
                highest = max(highest, int(digits))
    return highest
