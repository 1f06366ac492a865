"""What nodes that save files share: ComfyUI's `prefix_00001_.ext` names under a folder, the prompt as metadata,
and a prefix check that keeps every file inside its folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

from engine.errors import BadRequest, EngineError
from engine.files import create_new
from engine.folders import safe_join


def numbered_name(stem: str, counter: int, extension: str) -> str:
    return f"{stem}_{counter:05}_{extension}"


def split_prefix(base: Path, prefix: str) -> tuple[Path, str, str]:
    """(folder, subfolder, file name stem) of a prefix such as `portraits/day1/img`; never outside `base`."""
    subfolder, _, name = os.path.normpath(prefix.replace("\\", "/")).replace("\\", "/").rpartition("/")
    if not name or name == ".":
        raise BadRequest("the prefix needs a file name part")
    return safe_join(base, subfolder, name).parent, subfolder, name


def check_prefix(base: Path, prefix: object) -> bool | str:
    """VALIDATE_INPUTS of saving nodes: True, or why the prefix cannot be used (a 400 before anything runs)."""
    try:
        split_prefix(base, str(prefix))
    except EngineError as exc:
        return f"filename_prefix {prefix!r}: {exc}"
    return True


def prompt_metadata(prompt: dict | None, extra_pnginfo: dict | None) -> dict[str, str]:
    """ComfyUI's text metadata: `prompt`, and each key of `extra_pnginfo` (the workflow), as JSON."""
    text = {}
    if prompt is not None:
        text["prompt"] = json.dumps(prompt)
    for key, value in (extra_pnginfo or {}).items():
        text[key] = json.dumps(value)
    return text


def write_numbered(folder: Path, stem: str, counter: int, extension: str, data: bytes) -> int:
    """Write `data` under the first free number from `counter` on (never replacing a file); the number used."""
    while not create_new(folder / numbered_name(stem, counter, extension), data):
        counter += 1  # another writer took this number meanwhile
    return counter
