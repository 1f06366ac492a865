"""The known-models registry: model names a prompt may use without the file being on disk, each mapped to a file in
a Hugging Face hub repository (repo, path, revision, and the sha256 and size where they are published).

The packaged `known_models.json` is read first; a user's file (`--model-registry`) in the same format adds entries
and replaces packaged ones with the same folder and name. Both are validated when loaded, so a bad entry fails at
start-up with the file and the entry named, never in the middle of a prompt.

The folder vocabulary (ComfyUI's model folder names and the subdirectories of `models/` each reads) lives here too,
since registry entries and local folders must agree on it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from engine.errors import EngineError
from engine.folders import check_relative

# ComfyUI's model folder names -> the subdirectories of `<data-dir>/models/` each one reads, first = primary.
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "configs": ("configs",),
    "loras": ("loras",),
    "vae": ("vae",),
    "text_encoders": ("text_encoders", "clip"),
    "diffusion_models": ("unet", "diffusion_models"),
    "clip_vision": ("clip_vision",),
    "style_models": ("style_models",),
    "embeddings": ("embeddings",),
    "vae_approx": ("vae_approx",),
    "controlnet": ("controlnet", "t2i_adapter"),
    "gligen": ("gligen",),
    "upscale_models": ("upscale_models",),
    "latent_upscale_models": ("latent_upscale_models",),
    "hypernetworks": ("hypernetworks",),
    "photomaker": ("photomaker",),
    "model_patches": ("model_patches",),
    "audio_encoders": ("audio_encoders",),
    "background_removal": ("background_removal",),
}
# ComfyUI's legacy folder names (folder_paths.map_legacy): loaders and yaml files still use them.
LEGACY_FOLDERS = {"unet": "diffusion_models", "clip": "text_encoders"}

_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")
_FIELDS = {"name", "folder", "repo", "path", "revision", "sha256", "size", "note"}
_REQUIRED = ("name", "folder", "repo", "path", "revision")
PACKAGED = "known_models.json"


class RegistryError(EngineError):
    """A registry file or entry is malformed; the message names the file and the entry."""


def canonical_folder(name: str) -> str:
    """ComfyUI's current name for a folder (`unet` -> `diffusion_models`, `clip` -> `text_encoders`)."""
    return LEGACY_FOLDERS.get(name, name)


@dataclass(frozen=True)
class KnownModel:
    name: str  # what a prompt writes, e.g. "sd_xl_base_1.0.safetensors"
    folder: str  # canonical folder name
    repo: str  # "org/repo" on the hub
    path: str  # file path inside the repo
    revision: str  # a commit (pinned) or a branch/tag name
    sha256: str | None = None  # lowercase hex of the whole file, when published
    size: int | None = None  # bytes, when published
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "folder": self.folder, "repo": self.repo, "path": self.path,
                                "revision": self.revision}
        if self.sha256:
            data["sha256"] = self.sha256
        if self.size is not None:
            data["size"] = self.size
        if self.note:
            data["note"] = self.note
        return data


def parse_entry(raw: Any, where: str, folders: Iterable[str] = MODEL_FOLDERS) -> KnownModel:
    """One entry, checked field by field; `where` names the file and index in the error."""
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: an entry must be an object, got {type(raw).__name__}")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise RegistryError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
    for key in _REQUIRED:
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise RegistryError(f"{where}: {key!r} must be a non-empty string")
    name, path = raw["name"], raw["path"]
    for label, value in (("name", name), ("path", path)):
        try:
            check_relative(value, label)
        except EngineError as exc:
            raise RegistryError(f"{where}: {exc}") from None
        if value.startswith("hf://") or value.endswith("/") or "\\" in value:
            raise RegistryError(f"{where}: {label} {value!r} must be a plain relative file name with '/' separators")
    folder = canonical_folder(raw["folder"])
    if folder not in set(folders):
        raise RegistryError(f"{where}: unknown folder {raw['folder']!r}; use one of {sorted(set(folders))}")
    if not _REPO.match(raw["repo"]):
        raise RegistryError(f"{where}: repo {raw['repo']!r} must look like 'org/name'")
    if not _REVISION.match(raw["revision"]) or ".." in raw["revision"]:
        raise RegistryError(f"{where}: revision {raw['revision']!r} is not a commit, branch or tag name")
    sha256 = raw.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.match(sha256)):
        raise RegistryError(f"{where}: sha256 must be 64 lowercase hex digits, got {sha256!r}")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise RegistryError(f"{where}: size must be a positive integer (bytes), got {size!r}")
    note = raw.get("note", "")
    if not isinstance(note, str):
        raise RegistryError(f"{where}: note must be a string")
    return KnownModel(name=name, folder=folder, repo=raw["repo"], path=path, revision=raw["revision"],
                      sha256=sha256, size=size, note=note)


def parse_registry(data: Any, source: str) -> list[KnownModel]:
    """Every entry of a registry document; duplicates (same folder and name) within one file are an error."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise RegistryError(f"{source}: expected an object with a 'models' list")
    if data.get("version", 1) != 1:
        raise RegistryError(f"{source}: unsupported registry version {data.get('version')!r} (this reads version 1)")
    entries, seen = [], set()
    for index, raw in enumerate(data["models"]):
        entry = parse_entry(raw, f"{source}, models[{index}]")
        key = (entry.folder, entry.name)
        if key in seen:
            raise RegistryError(f"{source}, models[{index}]: {entry.folder}/{entry.name} is listed twice")
        seen.add(key)
        entries.append(entry)
    return entries


def read_registry_file(path: Path) -> list[KnownModel]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"cannot read the model registry {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return parse_registry(data, str(path))


def packaged_entries() -> list[KnownModel]:
    text = resources.files("engine").joinpath(PACKAGED).read_text(encoding="utf-8")
    return parse_registry(json.loads(text), f"engine/{PACKAGED}")


class Registry:
    """Entries by (folder, name); later sources replace earlier ones."""

    def __init__(self, entries: Iterable[KnownModel] = ()):
        self._entries: dict[tuple[str, str], KnownModel] = {}
        for entry in entries:
            self._entries[(entry.folder, entry.name)] = entry

    @classmethod
    def load(cls, user_file: Path | None = None) -> Registry:
        """The packaged registry, plus the user's file when given (its entries win)."""
        entries = packaged_entries()
        if user_file is not None:
            entries += read_registry_file(user_file)
        return cls(entries)

    def get(self, folder: str, name: str) -> KnownModel | None:
        return self._entries.get((canonical_folder(folder), name))

    def names(self, folder: str) -> list[str]:
        folder = canonical_folder(folder)
        return sorted(name for (f, name) in self._entries if f == folder)

    def entries(self) -> list[KnownModel]:
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
