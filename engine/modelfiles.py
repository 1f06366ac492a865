"""Model files in the data directory's `models/<folder>/`, as in ComfyUI's base directory: listing what a loader
offers and finding the file a prompt names."""
from __future__ import annotations

import os
from pathlib import Path

from engine.errors import NotFound
from engine.folders import check_relative

MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")


class ModelFiles:
    def __init__(self, root: Path):
        self.root = root

    def folder(self, name: str) -> Path:
        return self.root / name

    def list(self, folder: str) -> list[str]:
        """Files below `models/<folder>/` with a model extension, relative names with `/`, sorted."""
        base = self.folder(folder)
        found = []
        for directory, _dirs, files in os.walk(base, followlinks=True):
            rel = Path(directory).relative_to(base)
            found += [(rel / f).as_posix() for f in files if f.lower().endswith(MODEL_EXTENSIONS)]
        return sorted(found)

    def find(self, folder: str, name: str) -> Path:
        """The file a prompt names (a relative name, subfolders allowed), or NotFound saying where it looked."""
        check_relative(name)  # symbolic links are followed: model folders often link to shared volumes
        path = self.folder(folder) / name.replace("\\", "/")
        if not name or not path.is_file():
            raise NotFound(f"no {folder} file named {name!r}: looked in {self.folder(folder)}")
        return path
