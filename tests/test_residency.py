"""Resident models: loads shared between prompts, least-recently-used eviction under a budget, reload after
eviction with identical results, models in use never evicted, `POST /free`, and patches applied through the
handles' `active()`. Tiny SD1 checkpoints from tests/tiny_models.py; each file is a different seed."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from starlette.testclient import TestClient

from engine import autoencode
from engine.checkpoints import open_checkpoint, open_vae, private_cache
from engine.devices import policy_for
from engine.executor import Executor
from engine.patching import PatchSet, WeightPatch
from engine.residency import ModelCache, ModelKey, default_budget, usable_ram
from engine.settings import Settings
from handler import free
from handler.app import create_app
from tests.tiny_models import write_checkpoint

CPU = policy_for(torch.device("cpu"))
PNG = {"Accept": "image/png", "Cache-Control": "no-cache"}


class Events:
    """Collects what a ModelCache reports."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []

    def __call__(self, event: str, data: dict, client_id: str | None = None) -> None:
        if event in ("model_load", "model_evict"):
            self.seen.append((event, data))

    def names(self, event: str) -> list[str]:
        return [data["name"] for kind, data in self.seen if kind == event]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return {name: write_checkpoint(folder, "sd1", seed=seed, name=f"{name}.safetensors")
            for seed, name in enumerate("abc")}


@pytest.fixture(scope="module")
def one_checkpoint_bytes(files) -> int:
    cache = private_cache(torch.device("cpu"))
    open_checkpoint(files["a"], CPU, cache)
    return cache.used_bytes


def outputs(model, clip, vae) -> list[torch.Tensor]:
    """Deterministic results of all three networks of a checkpoint."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    cond, pooled = clip.encode("a red cat")
    with model.active():
        denoised = model(x, torch.tensor([2.0]), cond, None)
    with vae.active() as autoencoder:
        image = autoencode.decode(autoencoder, x)
    return [cond, pooled, denoised, image]


def same(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second))


def keys(*handles) -> list[ModelKey]:
    return [handle.resident.key for handle in handles]


# -- the cache ------------------------------------------------------------------------------------------------
def test_a_second_load_of_the_same_file_shares_the_first(files):
    events = Events()
    cache = ModelCache(10 * 2 ** 30, torch.device("cpu"), events)
    first = open_checkpoint(files["a"], CPU, cache)
    second = open_checkpoint(files["a"], CPU, cache)
    assert sorted(events.names("model_load")) == ["a.safetensors"] * 3  # unet, text, vae: once each
    assert first[0].unet is second[0].unet
    assert {e["kind"] for e in cache.entries()} == {"unet", "text", "vae"}
    loads = [data for kind, data in events.seen if kind == "model_load"]
    assert all(d["folder"] == "checkpoints" and d["bytes"] > 0 and d["seconds"] >= 0 for d in loads)
    assert sum(d["bytes"] for d in loads) == cache.used_bytes


def test_loading_over_budget_evicts_and_using_again_reloads_identically(files, one_checkpoint_bytes):
    events = Events()
    cache = ModelCache(int(one_checkpoint_bytes * 1.5), torch.device("cpu"), events)
    handles_a = open_checkpoint(files["a"], CPU, cache)
    before = outputs(*handles_a)
    model_a, clip_a, vae_a = handles_a
    networks = {model_a.resident.key: model_a.unet, clip_a.resident.key: clip_a.encoder.branches["l"].model}
    with vae_a.active() as autoencoder:
        networks[vae_a.resident.key] = autoencoder
    open_checkpoint(files["b"], CPU, cache)
    assert "a.safetensors" in events.names("model_evict")
    evicted = [k for k in keys(*handles_a) if not cache.is_resident(k)]
    assert evicted
    assert cache.used_bytes <= cache.budget_bytes
    for key in evicted:  # the weights are gone, not merely forgotten: a stale reference sees meta tensors
        assert next(networks[key].parameters()).device.type == "meta", key.kind

    loads = len(events.names("model_load"))
    after = outputs(*handles_a)  # the handles outlived the eviction and load their networks again
    assert len(events.names("model_load")) > loads
    assert same(before, after), "reloaded networks must give bit-identical results"
    assert cache.used_bytes <= cache.budget_bytes


def test_the_least_recently_used_checkpoint_goes_first(files, one_checkpoint_bytes):
    cache = ModelCache(int(one_checkpoint_bytes * 2.5), torch.device("cpu"))
    a = open_checkpoint(files["a"], CPU, cache)
    b = open_checkpoint(files["b"], CPU, cache)
    outputs(*a)  # a is now more recent than b
    c = open_checkpoint(files["c"], CPU, cache)
    assert all(cache.is_resident(k) for k in keys(*a, *c))
    assert not all(cache.is_resident(k) for k in keys(*b))  # room for c was made from b alone


def test_a_model_in_use_is_not_evicted(files, one_checkpoint_bytes):
    cache = ModelCache(int(one_checkpoint_bytes * 1.2), torch.device("cpu"))
    model_a = open_checkpoint(files["a"], CPU, cache)[0]
    with model_a.active() as unet:
        open_checkpoint(files["b"], CPU, cache)
        assert cache.is_resident(model_a.resident.key)
        assert next(unet.parameters()).device.type == "cpu"
        with model_a.active():  # a second user of the same handle: no second pin, no second patching
            open_checkpoint(files["c"], CPU, cache)
        assert cache.is_resident(model_a.resident.key)
    open_checkpoint(files["b"], CPU, cache)
    assert not cache.is_resident(model_a.resident.key)


def test_a_model_larger_than_the_budget_is_kept_while_in_use(files):
    cache = ModelCache(1, torch.device("cpu"))
    model, clip, _ = open_checkpoint(files["a"], CPU, cache)  # each network evicts the one loaded before it
    with model.active(), clip.active():
        assert cache.is_resident(model.resident.key) and cache.is_resident(clip.resident.key)
        assert cache.used_bytes > cache.budget_bytes  # over budget rather than pulling weights from under a user
    assert cache.entries() == [] and cache.used_bytes == 0  # back under the budget once they are free to go


def test_unload_all_waits_for_users_and_empties_the_cache(files):
    events = Events()
    cache = ModelCache(10 * 2 ** 30, torch.device("cpu"), events)
    model, clip, vae = open_checkpoint(files["a"], CPU, cache)
    with model.active():
        cache.unload_all()
        assert cache.is_resident(model.resident.key)  # in use: goes when the block ends
        assert not cache.is_resident(clip.resident.key)
    assert cache.entries() == [] and cache.used_bytes == 0
    assert sorted(events.names("model_evict")) == ["a.safetensors"] * 3


def test_concurrent_users_of_one_model_cause_one_load():
    events = Events()
    cache = ModelCache(2 ** 30, torch.device("cpu"), events)
    calls = []

    def load():
        calls.append(1)
        time.sleep(0.05)  # long enough for every thread to arrive while the first loads
        layer = torch.nn.Linear(4, 4)
        return layer, [layer]

    resident = cache.resident(ModelKey("/models/x.safetensors", "unet", torch.float32, torch.device("cpu")), load)
    results = []

    def use():
        with resident.use() as layer:
            results.append(layer)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(events.names("model_load")) == 1
    assert len(results) == 8 and all(r is results[0] for r in results)


def test_budget_from_settings():
    cpu = torch.device("cpu")
    assert ModelCache.from_settings(Settings(memory_budget_mb=64), cpu).budget_bytes == 64 * 2 ** 20
    auto = ModelCache.from_settings(Settings(), cpu).budget_bytes
    assert auto == default_budget(cpu) == usable_ram() // 2


# -- handles ----------------------------------------------------------------------------------------------------
class Shift(WeightPatch):
    """A minimal patch: adds `delta * strength` to the weight."""

    def __init__(self, delta: float):
        self.delta = delta

    def update(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        return weight.add_(self.delta * strength)


def test_patches_apply_inside_active_and_come_off_for_a_plain_handle(files):
    cache = ModelCache(10 * 2 ** 30, torch.device("cpu"))
    model, clip, vae = open_checkpoint(files["a"], CPU, cache)
    plain = outputs(model, clip, vae)
    weight_name = "out.2.bias"
    original = dict(model.unet.named_parameters())[weight_name].detach().clone()
    lora_model = model.with_patches(PatchSet("unet", ((weight_name, Shift(1.0), 0.5),)))
    lora_clip = clip.with_patches(PatchSet("text0", (("text_model.final_layer_norm.bias", Shift(1.0), 1.0),)))
    assert lora_model.unet is model.unet  # the same weights, no copy
    with lora_model.active() as unet:
        assert torch.equal(dict(unet.named_parameters())[weight_name], original + 0.5)
    patched = outputs(lora_model, lora_clip, vae)
    assert not torch.equal(patched[0], plain[0]) and not torch.equal(patched[2], plain[2])
    with model.active() as unet:
        assert torch.equal(dict(unet.named_parameters())[weight_name], original)  # restored bit for bit
    assert same(outputs(model, clip, vae), plain)
    cache.unload_all()  # evicted while patched: the reload is the file's weights again
    assert same(outputs(model, clip, vae), plain)
    assert same(outputs(lora_model, lora_clip, vae), patched)


def test_handles_work_where_networks_were_expected(files):
    """Nodes that call the handle directly (no active()) keep working: each call activates for its duration."""
    model, clip, vae = open_checkpoint(files["a"], CPU, ModelCache(10 * 2 ** 30, torch.device("cpu")))
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with vae.active() as autoencoder:
        expected = autoencode.decode(autoencoder, latent)
    assert torch.equal(autoencode.decode(vae, latent), expected)
    assert vae.device == torch.device("cpu") and vae.dtype == torch.float32 and vae.downscale_factor == 8
    x, sigma = latent, torch.tensor([1.5])
    cond, _ = clip.encode("a cat")
    with model.active():
        inside = model(x, sigma, cond, None)
    assert torch.equal(model(x, sigma, cond, None), inside)


def test_a_standalone_vae_shares_the_checkpoints_vae_entry(files):
    events = Events()
    cache = ModelCache(10 * 2 ** 30, torch.device("cpu"), events)
    vae = open_checkpoint(files["a"], CPU, cache)[2]
    again = open_vae(files["a"], CPU, cache, folder="vae")
    assert again.resident.key == vae.resident.key
    assert len(events.names("model_load")) == 3


# -- through the service ----------------------------------------------------------------------------------------
@pytest.fixture
def wired(monkeypatch):
    """The executor's ModelCache and the context's `resident` field, for a tree where the executor does not set
    them up yet (a no-op once it does)."""
    init, context = Executor.__init__, Executor.context

    def wired_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not hasattr(self, "resident"):
            self.resident = ModelCache.from_settings(self.settings, self.policy.device, events=self.emit)

    def wired_context(self, *args, **kwargs):
        ctx = context(self, *args, **kwargs)
        if getattr(ctx, "resident", None) is None:
            ctx.resident = self.resident
        return ctx

    monkeypatch.setattr(Executor, "__init__", wired_init)
    monkeypatch.setattr(Executor, "context", wired_context)


@pytest.fixture
def service(wired, tmp_path, files, registry):
    settings = Settings(data_dir=tmp_path / "data", cache_size=0)  # no output cache: every prompt runs its loader
    settings.models_dir.mkdir(parents=True)
    (settings.models_dir / "checkpoints").symlink_to(files["a"].parent, target_is_directory=True)
    app = create_app(settings, registry)
    if not any(getattr(route, "path", None) == "/free" for route in app.routes):
        app.router.routes.extend(free.ROUTES)
    with TestClient(app) as client:
        events = Events()
        client.app.state.executor.add_listener(events)
        yield client, events


def txt2img(ckpt: str = "a.safetensors", seed: int = 1) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["2", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "res"}},
    }


def test_two_prompts_share_one_load(service):
    client, events = service
    first = client.post("/api/v1/prompts", json=txt2img(seed=1), headers=PNG)
    second = client.post("/api/v1/prompts", json=txt2img(seed=2), headers=PNG)
    assert first.status_code == second.status_code == 200
    assert events.names("model_load") == ["a.safetensors"] * 3  # the second prompt's loader found them resident


def test_free_unloads_and_the_next_prompt_reloads_to_the_same_image(service):
    client, events = service
    first = client.post("/api/v1/prompts", json=txt2img(), headers=PNG)
    response = client.post("/free", json={"unload_models": True})
    assert response.status_code == 200 and response.content == b""
    executor = client.app.state.executor
    assert executor.resident.entries() == []
    assert sorted(events.names("model_evict")) == ["a.safetensors"] * 3
    again = client.post("/api/v1/prompts", json=txt2img(), headers=PNG)
    assert again.status_code == 200 and again.content == first.content
    assert len(events.names("model_load")) == 6


def test_free_memory_also_drops_cached_outputs(service, tmp_path):
    client, _ = service
    executor = client.app.state.executor
    executor.cache.capacity = 8
    client.post("/api/v1/prompts", json=txt2img(), headers=PNG)
    assert len(executor.cache) > 0 and executor.resident.entries()
    assert client.post("/free", json={"free_memory": True}).status_code == 200
    assert len(executor.cache) == 0 and executor.resident.entries() == []
    assert client.post("/free", json={}).status_code == 200  # nothing asked: nothing done
    assert client.post("/free", content=b"[1]").status_code == 400
