"""The data directory's folders and the one function that turns a user-given name into a path inside them.

Every file name that arrives from a request (`/view`, `/upload/image`, `LoadImage`, a `SaveImage` prefix) goes
through `safe_join`, which refuses absolute paths, `..`, and symbolic links that lead out of the folder.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import BadRequest, Forbidden

FOLDER_TYPES = ("input", "output", "temp")
_ANNOTATION = re.compile(r"^(?P<name>.*?)\s*\[(?P<kind>input|output|temp)\]$")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Folders:
    input: Path
    output: Path
    temp: Path

    def ensure(self) -> None:
        for folder in (self.input, self.output, self.temp):
            folder.mkdir(parents=True, exist_ok=True)

    def by_type(self, kind: str | None) -> Path:
        """The folder of a `type` parameter (ComfyUI's input/output/temp)."""
        if kind not in FOLDER_TYPES:
            raise BadRequest(f"type must be one of {', '.join(FOLDER_TYPES)}, got {kind!r}")
        return getattr(self, kind)

    def resolve(self, kind: str, subfolder: str, filename: str) -> Path:
        return safe_join(self.by_type(kind), subfolder, filename)

    def annotated(self, name: str, default: str = "input") -> Path:
        """ComfyUI's annotated names: `file.png [output]` names a file in another folder than the default."""
        match = _ANNOTATION.match(name)
        kind, name = (match["kind"], match["name"]) if match else (default, name)
        subfolder, _, filename = name.replace("\\", "/").rpartition("/")
        return self.resolve(kind, subfolder, filename)

    def list_images(self, kind: str = "input") -> list[str]:
        """Image files below a folder, as names relative to it, sorted (what LoadImage offers)."""
        base = self.by_type(kind)
        found = []
        for root, _dirs, files in os.walk(base):
            rel = Path(root).relative_to(base)
            for name in files:
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                    found.append((rel / name).as_posix())
        return sorted(found)


def safe_join(base: Path, subfolder: str, filename: str) -> Path:
    """`base/subfolder/filename`, guaranteed to stay inside `base` after resolving symbolic links."""
    if not filename or filename in (".", ".."):
        raise BadRequest("a file name is required")
    check_relative(subfolder, "subfolder")
    check_relative(filename, "filename")
    if "/" in filename or "\\" in filename:
        raise BadRequest(f"filename {filename!r} must not contain a path separator; put directories in subfolder")
    root = base.resolve()
    candidate = (root / subfolder.replace("\\", "/") / filename).resolve()
    if candidate != root and root not in candidate.parents:
        raise Forbidden(f"{filename!r} resolves outside the folder (a symbolic link out is not followed)")
    return candidate


def check_relative(name: str, label: str = "name") -> None:
    """Refuse names that could leave the folder they are joined to: absolute, drive-letter, `..`, NUL."""
    if "\x00" in name:
        raise BadRequest(f"{label} contains a NUL character")
    pieces = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in pieces:
        raise Forbidden(f"{label} {name!r} points outside the folder; use a plain relative name")
