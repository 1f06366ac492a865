"""Where the model a prompt names comes from, in ComfyUI's folder vocabulary.

A name such as `sd_xl_base_1.0.safetensors` given to a loader of folder `checkpoints` is looked up, in order:
1. the local model folders: `<data-dir>/models/<folder>/` (ComfyUI's subdirectories, e.g. `unet` and
   `diffusion_models` for the unet folder) and the folders an `extra_model_paths.yaml` adds (ComfyUI's format:
   sections with an optional `base_path`, folder keys with one path or several on separate lines, `is_default`
   putting a section's folders first); symbolic links are followed, names never leave a folder;
2. the known-models registry (engine/known_models.json plus the user's file): the file comes from the hub cache,
   downloaded on first use;
3. an explicit `hf://org/repo/path/in/repo.safetensors[@revision]` written in the prompt, only for orgs or repos
   the operator allowed (`--hub-allow`); anything else is refused before any network call.

`check()` decides from the file system alone (validation must be fast and offline); `find()` may download.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

from engine.errors import EngineError, NotFound
from engine.folders import check_relative
from engine.hub import AllowList, EventFn, Hub, HubFile, ProgressFn, is_hub_reference, parse_reference
from engine.known_models import MODEL_FOLDERS, KnownModel, Registry, canonical_folder

log = logging.getLogger(__name__)

MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pt2", ".pth", ".bin")
FOLDER_EXTENSIONS = {"configs": (".yaml",)}  # every other known folder holds model files
_SKIPPED_DIRS = {".git", ".cache", "__pycache__"}


class ModelPathsError(EngineError):
    """The extra_model_paths.yaml file cannot be read or is not in ComfyUI's format."""


def read_extra_model_paths(path: Path) -> list[tuple[str, Path, bool]]:
    """(folder, directory, is_default) for each path an extra_model_paths.yaml lists, in file order.

    ComfyUI's rules: `base_path` has `~` and `$VARS` expanded and, when relative, is taken relative to the yaml's
    directory; each folder path is joined to `base_path` when there is one, else taken relative to the yaml's
    directory; a value may list several paths, one per line; legacy folder names (unet, clip) are mapped."""
    try:
        import yaml
    except ImportError:
        raise ModelPathsError("reading extra_model_paths.yaml needs PyYAML (pip install pyyaml)") from None
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelPathsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ModelPathsError(f"{path} is not valid YAML: {exc}") from None
    if config is None:
        return []
    if not isinstance(config, dict):
        raise ModelPathsError(f"{path}: expected sections (e.g. 'comfyui:') at the top level")
    yaml_dir = path.resolve().parent
    found: list[tuple[str, Path, bool]] = []
    for section, conf in config.items():
        if conf is None:
            continue
        if not isinstance(conf, dict):
            raise ModelPathsError(f"{path}: section {section!r} must map folder names to paths")
        conf = dict(conf)
        base = conf.pop("base_path", None)
        is_default = bool(conf.pop("is_default", False))
        if base is not None:
            base = os.path.expandvars(os.path.expanduser(str(base)))
            if not os.path.isabs(base):
                base = os.path.join(yaml_dir, base)
        for folder, value in conf.items():
            if isinstance(value, str):
                lines = value.split("\n")
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                lines = value
            else:
                raise ModelPathsError(f"{path}: {section}.{folder} must be a path or paths on separate lines")
            for line in (line.strip() for line in lines):
                if not line:
                    continue
                full = os.path.join(base, line) if base else (line if os.path.isabs(line) else
                                                             os.path.join(yaml_dir, line))
                found.append((canonical_folder(str(folder)), Path(os.path.normpath(full)), is_default))
    return found


class ModelFiles:
    """Local model folders, the known-models registry and the hub, behind ComfyUI's folder names."""

    def __init__(self, root: Path, *, extra: Iterable[tuple[str, Path, bool]] = (), registry: Registry | None = None,
                 hub: Hub | None = None, hub_allow: AllowList | str = "", events: EventFn | None = None):
        self.root = Path(root)
        self.registry = registry if registry is not None else Registry()
        self.hub = hub if hub is not None else Hub()
        self.allow = hub_allow if isinstance(hub_allow, AllowList) else AllowList(hub_allow)
        self.events = events
        self._folders: dict[str, list[Path]] = {name: [self.root / sub for sub in subs]
                                                for name, subs in MODEL_FOLDERS.items()}
        self._extra_only: set[str] = set()
        for folder, directory, is_default in extra:
            if folder not in self._folders:
                self._folders[folder] = []
                self._extra_only.add(folder)
            if is_default:
                self._folders[folder].insert(0, directory)
            else:
                self._folders[folder].append(directory)

    @classmethod
    def from_settings(cls, settings: Any, events: EventFn | None = None) -> ModelFiles:
        """The executor's instance: data-dir folders, extra_model_paths.yaml, packaged + user registry, the hub."""
        extra = read_extra_model_paths(settings.extra_model_paths) if settings.extra_model_paths else []
        registry = Registry.load(settings.model_registry)
        hub = Hub(retries=settings.download_retries)
        return cls(settings.models_dir, extra=extra, registry=registry, hub=hub, hub_allow=settings.hub_allow,
                   events=events)

    # -- folders -------------------------------------------------------------------------------------------------
    def folder_names(self) -> list[str]:
        """ComfyUI's folder names this server knows (what `GET /models` lists)."""
        return list(self._folders)

    def folders(self, folder: str) -> list[Path]:
        """Every directory searched for `folder`, in search order."""
        return list(self._folders.get(canonical_folder(folder), [self.root / folder]))

    def folder(self, name: str) -> Path:
        """The primary local directory of a folder (where a user would put a new file)."""
        return self.folders(name)[0]

    def _extensions(self, folder: str) -> tuple[str, ...] | None:
        folder = canonical_folder(folder)
        if folder in self._extra_only:
            return None  # ComfyUI lists every file of a folder only an extra_model_paths.yaml declares
        return FOLDER_EXTENSIONS.get(folder, MODEL_EXTENSIONS)

    # -- listing -------------------------------------------------------------------------------------------------
    def list(self, folder: str) -> list[str]:
        """Local files with a model extension (relative names with `/`) plus the registry's names, sorted."""
        extensions = self._extensions(folder)
        found: set[str] = set()
        for base in self.folders(folder):
            for directory, dirs, files in os.walk(base, followlinks=True):
                dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
                rel = Path(directory).relative_to(base)
                found.update((rel / f).as_posix() for f in files
                             if not f.startswith(".") and (extensions is None or f.lower().endswith(extensions)))
        found.update(self.registry.names(folder))
        return sorted(found)

    # -- lookup --------------------------------------------------------------------------------------------------
    def locate(self, folder: str, name: str) -> Path | None:
        """The local file a name denotes, or None. A name without an extension also matches `name.<ext>`."""
        check_relative(name)  # symbolic links are followed: model folders often link to shared volumes
        relative = name.replace("\\", "/")
        if not relative:
            return None
        candidates = [relative]
        if not relative.lower().endswith(MODEL_EXTENSIONS):
            candidates += [relative + ext for ext in MODEL_EXTENSIONS]
        for base in self.folders(folder):
            for candidate in candidates:
                path = base / candidate
                if path.is_file():
                    return path
        return None

    def known(self, folder: str, name: str) -> KnownModel | None:
        return self.registry.get(folder, name)

    def check(self, folder: str, name: str) -> None:
        """Whether `find` can deliver the name, decided without any network call: NotFound listing where it
        looked, Forbidden for an hf:// reference outside the allow-list, BadRequest for a malformed one."""
        if is_hub_reference(name):
            ref = parse_reference(name)
            self.allow.check(ref, name)
            self._check_offline(ref, folder, name)
            return
        if self.locate(folder, name) is not None:
            return
        entry = self.known(folder, name)
        if entry is not None:
            self._check_offline(_hub_file(entry), folder, name)
            return
        raise NotFound(self._not_found(folder, name))

    def find(self, folder: str, name: str, progress: ProgressFn | None = None,
             events: EventFn | None = None) -> Path:
        """The local path of the model a prompt names, downloading it into the hub cache first when needed
        (blocking); `progress(done_bytes, total_bytes)` is called while it downloads."""
        events = events if events is not None else self.events
        describe = {"folder": canonical_folder(folder), "name": name}
        if is_hub_reference(name):
            ref = parse_reference(name)
            self.allow.check(ref, name)  # before any network call
            return self.hub.fetch(ref, progress=progress, events=events, describe=describe)
        path = self.locate(folder, name)
        if path is not None:
            return path
        entry = self.known(folder, name)
        if entry is not None:
            return self.hub.fetch(_hub_file(entry), progress=progress, events=events, describe=describe)
        raise NotFound(self._not_found(folder, name))

    def _check_offline(self, ref: HubFile, folder: str, name: str) -> None:
        if self.hub.env().offline and not self.hub.has(ref):
            raise NotFound(f"{folder} {name!r} ({ref.display}) is not in the hub cache and HF_HUB_OFFLINE is set; "
                           "fill the cache while online or unset HF_HUB_OFFLINE")

    def _not_found(self, folder: str, name: str) -> str:
        places = ", ".join(str(p) for p in self.folders(folder))
        known = self.registry.names(folder)
        registry = (f"not among the {len(known)} known {folder} models (GET /models/{folder} lists them)" if known
                    else f"the known-models registry has no {folder} entries")
        hub = ("hf://org/repo/file references are allowed for " + ", ".join(sorted(self.allow.orgs | self.allow.repos))
               if self.allow else "hf:// references are turned off on this server")
        return f"no {folder} model named {name!r}: looked in {places}; {registry}; {hub}"


def _hub_file(entry: KnownModel) -> HubFile:
    return HubFile(repo=entry.repo, path=entry.path, revision=entry.revision, sha256=entry.sha256, size=entry.size)

