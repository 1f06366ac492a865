"""Model name resolution: local folders (data dir and ComfyUI's extra_model_paths.yaml), the known-models registry
(every packaged entry well-formed), hf:// parsing, the /models routes, and a prompt whose checkpoint comes from the
(fake) hub."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from engine.errors import BadRequest, Forbidden, NotFound
from engine.hub import AllowList, Hub, parse_reference
from engine.known_models import (LEGACY_FOLDERS, MODEL_FOLDERS, Registry, RegistryError,
                                 packaged_entries, parse_registry)
from engine.modelfiles import ModelFiles, ModelPathsError, read_extra_model_paths
from engine.settings import Settings
from handler.errors import EXCEPTION_HANDLERS
from handler.models import ROUTES
from tests.fake_hub import FakeHub

PACKAGED = Path(__file__).resolve().parents[1] / "engine" / "known_models.json"


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An endpoint nothing listens on: any network call would fail loudly (and check() must make none)."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


# -- local folders ------------------------------------------------------------------------------------------------
def test_local_files_listed_and_found_before_the_registry(tmp_path, offline_hub):
    models = tmp_path / "models"
    touch(models / "checkpoints" / "mine.safetensors")
    touch(models / "checkpoints" / "sub" / "deep.ckpt")
    touch(models / "checkpoints" / "notes.txt")
    local_copy = touch(models / "checkpoints" / "sd_xl_base_1.0.safetensors")
    files = ModelFiles(models, registry=Registry.load())
    names = files.list("checkpoints")
    assert {"mine.safetensors", "sub/deep.ckpt", "v1-5-pruned-emaonly.safetensors"} <= set(names)
    assert "notes.txt" not in names and names == sorted(set(names))
    assert files.find("checkpoints", "sd_xl_base_1.0.safetensors") == local_copy  # no download: the local wins
    assert files.find("checkpoints", "sub/deep.ckpt") == models / "checkpoints" / "sub" / "deep.ckpt"


def test_legacy_and_secondary_folder_names(tmp_path):
    models = tmp_path / "models"
    touch(models / "unet" / "a.safetensors")
    touch(models / "diffusion_models" / "b.safetensors")
    touch(models / "clip" / "c.safetensors")
    touch(models / "background_removal" / "u2net.pth")
    files = ModelFiles(models)
    assert files.list("unet") == files.list("diffusion_models") == ["a.safetensors", "b.safetensors"]
    assert files.list("clip") == ["c.safetensors"]
    assert files.folder("unet") == models / "unet"
    assert files.find("background_removal", "u2net") == models / "background_removal" / "u2net.pth"


def test_symlinked_folders_work_and_names_cannot_leave_them(tmp_path):
    shared = tmp_path / "shared-volume"
    touch(shared / "linked.safetensors")
    touch(tmp_path / "secret.safetensors")
    models = tmp_path / "models"
    models.mkdir()
    (models / "checkpoints").symlink_to(shared, target_is_directory=True)
    files = ModelFiles(models)
    assert files.list("checkpoints") == ["linked.safetensors"]
    assert files.find("checkpoints", "linked.safetensors").read_bytes() == b"x"
    for name in ("../../secret.safetensors", "/etc/passwd", "C:/x.safetensors"):
        with pytest.raises(Forbidden):
            files.check("checkpoints", name)


def test_unknown_name_lists_where_it_looked(tmp_path, offline_hub):
    files = ModelFiles(tmp_path / "models", registry=Registry.load(), hub_allow="my-org")
    with pytest.raises(NotFound) as error:
        files.check("checkpoints", "nope.safetensors")
    message = str(error.value)
    assert str(tmp_path / "models" / "checkpoints") in message
    assert "known checkpoints models" in message and "my-org" in message
    with pytest.raises(NotFound, match="hf:// references are turned off"):
        ModelFiles(tmp_path / "models").find("loras", "nope.safetensors")


def test_registry_names_pass_check_without_network(tmp_path, offline_hub):
    files = ModelFiles(tmp_path / "models", registry=Registry.load(), hub=Hub(retries=1, backoff_s=0))
    files.check("checkpoints", "sd_xl_base_1.0.safetensors")
    files.check("loras", "pixel-art-xl-v1.1.safetensors")
    files.check("background_removal", "u2net")
    with pytest.raises(NotFound):
        files.check("loras", "sd_xl_base_1.0.safetensors")  # a name is known in its own folder only


def test_extra_model_paths_yaml(tmp_path, monkeypatch):
    a1111 = tmp_path / "webui"
    touch(a1111 / "models" / "Stable-diffusion" / "webui.safetensors")
    touch(a1111 / "models" / "Lora" / "l1.safetensors")
    touch(a1111 / "models" / "LyCORIS" / "l2.safetensors")
    shared = tmp_path / "shared"
    touch(shared / "checkpoints" / "both.safetensors", b"from shared")
    touch(shared / "unet" / "u.safetensors")
    touch(shared / "custom" / "anything.txt")
    touch(tmp_path / "config" / "beside" / "rel.safetensors")
    models = tmp_path / "data" / "models"
    touch(models / "checkpoints" / "both.safetensors", b"from data dir")
    monkeypatch.setenv("SHARED_ROOT", str(shared))
    config = tmp_path / "config" / "extra_model_paths.yaml"
    config.write_text("""
a111:
    base_path: ../webui/
    checkpoints: models/Stable-diffusion
    loras: |
         models/Lora
         models/LyCORIS
shared:
    base_path: $SHARED_ROOT
    is_default: true
    checkpoints: checkpoints/
    unet: unet
    custom_things: custom
relative:
    vae: beside
empty:
""")
    extra = read_extra_model_paths(config)
    assert (("loras", a1111 / "models" / "LyCORIS", False) in extra
            and ("diffusion_models", shared / "unet", True) in extra
            and ("vae", tmp_path / "config" / "beside", False) in extra)
    files = ModelFiles(models, extra=extra)
    assert files.folders("checkpoints") == [shared / "checkpoints", models / "checkpoints",
                                            a1111 / "models" / "Stable-diffusion"]
    assert files.list("checkpoints") == ["both.safetensors", "webui.safetensors"]
    assert files.find("checkpoints", "both.safetensors").read_bytes() == b"from shared"  # is_default goes first
    assert files.list("loras") == ["l1.safetensors", "l2.safetensors"]
    assert files.list("unet") == ["u.safetensors"]
    assert files.list("vae") == ["rel.safetensors"]
    assert "custom_things" in files.folder_names() and files.list("custom_things") == ["anything.txt"]

    settings = Settings(data_dir=tmp_path / "data", extra_model_paths=config)
    assert ModelFiles.from_settings(settings).list("loras") == ["l1.safetensors", "l2.safetensors",
                                                               "lcm-lora-sdv1-5.safetensors",
                                                               "lcm-lora-sdxl.safetensors",
                                                               "pixel-art-xl-v1.1.safetensors"]
    config.write_text("a: [1, 2")
    with pytest.raises(ModelPathsError, match="not valid YAML"):
        read_extra_model_paths(config)
    config.write_text("a:\n  checkpoints: 3\n")
    with pytest.raises(ModelPathsError, match="a.checkpoints"):
        read_extra_model_paths(config)


# -- the registry ---------------------------------------------------------------------------------------------------
def test_every_packaged_entry_is_well_formed():
    raw = json.loads(PACKAGED.read_text())["models"]
    entries = packaged_entries()
    assert len(entries) == len(raw)
    keys = [(e.folder, e.name) for e in entries]
    assert len(set(keys)) == len(keys)
    for entry, source in zip(entries, raw):
        assert entry.folder in MODEL_FOLDERS and source["folder"] not in LEGACY_FOLDERS
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", entry.repo)
        assert entry.revision == "main" or re.fullmatch(r"[0-9a-f]{40}", entry.revision), entry
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256), entry
        assert entry.size is None or entry.size > 1_000_000, entry  # every listed model is megabytes
        assert entry.path and not entry.path.startswith("/") and ".." not in entry.path.split("/")
    names = {(e.folder, e.name) for e in entries}
    required = {("checkpoints", "v1-5-pruned-emaonly.safetensors"), ("checkpoints", "v2-1_768-ema-pruned.safetensors"),
                ("checkpoints", "sd_xl_base_1.0.safetensors"), ("checkpoints", "sd_xl_refiner_1.0.safetensors"),
                ("checkpoints", "sd_xl_turbo_1.0_fp16.safetensors"), ("vae", "sdxl_vae.safetensors"),
                ("vae", "vae-ft-mse-840000-ema-pruned.safetensors"), ("loras", "lcm-lora-sdv1-5.safetensors"),
                ("loras", "lcm-lora-sdxl.safetensors"), ("loras", "pixel-art-xl-v1.1.safetensors"),
                ("background_removal", "u2net"), ("background_removal", "u2netp")}
    assert required <= names, required - names


@pytest.mark.parametrize("change, message", [
    ({"sha256": "ABC"}, "sha256 must be 64 lowercase hex"),
    ({"folder": "weights"}, "unknown folder 'weights'"),
    ({"path": "../x.safetensors"}, "points outside"),
    ({"repo": "no-slash"}, "must look like 'org/name'"),
    ({"size": -1}, "size must be a positive integer"),
    ({"revision": ""}, "'revision' must be a non-empty string"),
    ({"url": "https://x"}, "unknown field"),
])
def test_malformed_registry_entries_are_refused(change, message):
    entry = {"name": "a.safetensors", "folder": "checkpoints", "repo": "org/repo", "path": "a.safetensors",
             "revision": "main", **change}
    with pytest.raises(RegistryError, match=message) as error:
        parse_registry({"models": [entry]}, "user.json")
    assert "user.json, models[0]" in str(error.value)


def test_duplicates_and_user_overrides(tmp_path):
    entry = {"name": "sd_xl_base_1.0.safetensors", "folder": "checkpoints", "repo": "mirror/sdxl",
             "path": "base.safetensors", "revision": "main"}
    with pytest.raises(RegistryError, match="listed twice"):
        parse_registry({"models": [entry, dict(entry)]}, "user.json")
    user = tmp_path / "registry.json"
    user.write_text(json.dumps({"version": 1, "models": [entry, {**entry, "name": "extra.safetensors",
                                                                 "folder": "unet"}]}))
    registry = Registry.load(user)
    assert registry.get("checkpoints", "sd_xl_base_1.0.safetensors").repo == "mirror/sdxl"
    assert registry.names("diffusion_models") == registry.names("unet") == ["extra.safetensors"]
    assert len(registry) == len(packaged_entries()) + 1
    user.write_text("{not json")
    with pytest.raises(RegistryError, match="not valid JSON"):
        Registry.load(user)


# -- hf:// references ----------------------------------------------------------------------------------
def test_parse_hub_references():
    ref = parse_reference("hf://org/repo/sub/dir/file.safetensors@refs/pr/3")
    assert (ref.repo, ref.path, ref.revision) == ("org/repo", "sub/dir/file.safetensors", "refs/pr/3")
    assert parse_reference("hf://org/repo/file.safetensors").revision == "main"
    for bad in ("hf://org/repo", "hf://org/repo/", "hf://org//file", "hf://org/repo/a/../b", "hf:/org/repo/f",
                "hf://org/repo/f@", "hf://org/repo/f@../x"):
        with pytest.raises(BadRequest):
            parse_reference(bad)
    allow = AllowList(" Org-A , someone/Repo ,")
    assert allow.allows("org-a/anything") and allow.allows("SOMEONE/repo") and not allow.allows("someone/other")
    assert not AllowList("")


# -- routes --------------------------------------------------------------------------------------------
def test_models_routes(tmp_path):
    models = tmp_path / "models"
    touch(models / "checkpoints" / "mine.safetensors")
    app = Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS)
    app.state.executor = SimpleNamespace(models=ModelFiles(models, registry=Registry.load()))
    app.state.settings = Settings(data_dir=tmp_path)
    with TestClient(app) as client:
        folders = client.get("/models").json()
        assert {"checkpoints", "loras", "vae", "embeddings", "background_removal", "diffusion_models"} <= set(folders)
        names = client.get("/models/checkpoints").json()
        assert "mine.safetensors" in names and "sd_xl_base_1.0.safetensors" in names
        assert client.get("/models/background_removal").json() == ["u2net", "u2netp"]
        assert client.get("/models/unet").json() == []
        assert client.get("/models/nope").status_code == 404


# -- a prompt whose checkpoint comes from the hub ---------------------------------------------------------------------
def test_registry_checkpoint_from_the_hub_loads(tmp_path, monkeypatch):
    """ModelFiles.from_settings with a user registry naming a tiny checkpoint the fake hub serves: the file
    arrives verified and the real checkpoint loader reads it."""
    from engine.checkpoints import load_checkpoint
    from engine.devices import policy_for
    import torch
    from tests.tiny_models import write_checkpoint

    data = write_checkpoint(tmp_path / "src", "sd1").read_bytes()
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"models": [{
        "name": "hub_sd1.safetensors", "folder": "checkpoints", "repo": "test-org/tiny-sd1",
        "path": "tiny_sd1.safetensors", "revision": "main", "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data)}]}))
    with FakeHub() as hub:
        hub.publish("test-org/tiny-sd1", "tiny_sd1.safetensors", data)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        settings = Settings(data_dir=tmp_path / "data", model_registry=registry)
        events = []
        files = ModelFiles.from_settings(settings, events=lambda event, payload: events.append(event))
        assert "hub_sd1.safetensors" in files.list("checkpoints")
        files.check("checkpoints", "hub_sd1.safetensors")
        assert hub.requests == 0
        loaded = load_checkpoint(files.find("checkpoints", "hub_sd1.safetensors"), policy_for(torch.device("cpu")))
        assert loaded.family.name == "sd1" and events == ["model_download"] and hub.gets(
            "test-org/tiny-sd1", "tiny_sd1.safetensors") == 1


def test_prompt_with_a_registry_checkpoint_end_to_end(tmp_path, monkeypatch, make_client):
    """Through the HTTP API: CheckpointLoaderSimple names a registry entry the fake hub serves. Needs the executor
    to build `ModelFiles.from_settings(settings)`; skipped until it does."""
    from tests.test_inference import PNG, image_of, txt2img
    from tests.tiny_models import write_checkpoint

    data = write_checkpoint(tmp_path / "src", "sd1").read_bytes()
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"models": [{
        "name": "tiny_hub.safetensors", "folder": "checkpoints", "repo": "test-org/tiny-sd1",
        "path": "tiny_sd1.safetensors", "revision": "main", "sha256": hashlib.sha256(data).hexdigest()}]}))
    with FakeHub() as hub:
        hub.publish("test-org/tiny-sd1", "tiny_sd1.safetensors", data)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        client = make_client(Settings(data_dir=tmp_path / "data", model_registry=registry))
        if not len(client.app.state.executor.models.registry):
            pytest.skip("the executor does not build ModelFiles.from_settings(settings) yet")
        prompt = txt2img()
        prompt["4"]["inputs"]["ckpt_name"] = "tiny_hub.safetensors"
        first = image_of(client.post("/api/v1/prompts", json=prompt, headers=PNG))
        prompt["9"]["inputs"]["filename_prefix"] = "again"
        assert (image_of(client.post("/api/v1/prompts", json=prompt, headers=PNG)) == first).all()
        assert hub.gets("test-org/tiny-sd1", "tiny_sd1.safetensors") == 1
        assert client.get("/object_info/CheckpointLoaderSimple").json()["CheckpointLoaderSimple"]["input"][
            "required"]["ckpt_name"][0].count("tiny_hub.safetensors") == 1
