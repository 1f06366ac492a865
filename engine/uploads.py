"""Saving uploaded files: never replacing an existing file unless asked, and staging a request's own files where
only that request sees them first."""
from __future__ import annotations

import uuid
from pathlib import Path

from engine.files import create_new, write_atomic
from engine.folders import Folders, safe_join


def save_upload(folders: Folders, kind: str, subfolder: str, filename: str, data: bytes,
                overwrite: bool = False) -> str:
    """Store an upload and return the name to use in a prompt. Without `overwrite`, an existing file with other
    content is kept and the upload gets the next free `name (N).ext`; identical content reuses the name."""
    path = folders.resolve(kind, subfolder, filename)
    if overwrite:
        write_atomic(path, data)
        return path.name
    stem, suffix = path.stem, path.suffix
    candidate, n = path, 0
    while True:
        if candidate.is_file() and candidate.read_bytes() == data:
            return candidate.name
        if create_new(candidate, data):
            return candidate.name
        n += 1
        candidate = path.with_name(f"{stem} ({n}){suffix}")


def stage_request_files(folders: Folders, files: list[tuple[str, bytes]]) -> tuple[Path | None, dict[str, Path]]:
    """Write a request's files to a scratch folder of its own (the names the prompt uses resolve there first, so
    concurrent requests with the same file names never see each other's files) and keep a copy in `input/`."""
    if not files:
        return None, {}
    scratch = folders.temp / "requests" / uuid.uuid4().hex
    staged = {}
    for filename, data in files:
        path = safe_join(scratch, "", filename)
        write_atomic(path, data)
        staged[filename] = path
        save_upload(folders, "input", "", filename, data)
    return scratch, staged
