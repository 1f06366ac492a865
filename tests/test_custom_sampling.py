"""The custom-sampling nodes (nodes/custom_sampling.py): schedules against their formulas, and SamplerCustom /
SamplerCustomAdvanced against KSampler on a tiny checkpoint through the HTTP app (the same noise, schedule,
guidance and sampler give the same latent)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.registry import NodeRegistry
from engine.sampling import ksampler
from engine.sampling.model_sampling import ModelSampling
from engine.sampling.schedules import SCHEDULERS
from engine.settings import Settings
from nodes import custom_sampling as cs
from tests.conftest import settings_with_checkpoints
from tests.tiny_models import write_checkpoint


class Handle:
    sampling = ModelSampling()


def test_basic_scheduler_takes_the_tail_for_partial_denoise():
    (full,) = cs.BasicScheduler().get_sigmas(Handle(), "karras", 10, 1.0)
    assert torch.equal(full, SCHEDULERS["karras"](Handle.sampling, 10))
    (partial,) = cs.BasicScheduler().get_sigmas(Handle(), "normal", 10, 0.4)
    assert torch.equal(partial, SCHEDULERS["normal"](Handle.sampling, 25)[-11:])  # int(10 / 0.4)
    (none,) = cs.BasicScheduler().get_sigmas(Handle(), "normal", 10, 0.0)
    assert none.shape == (0,)
    assert torch.equal(partial, ksampler.calculate_sigmas(Handle.sampling, "normal", 10, "euler", 0.4))


def test_karras_and_exponential_schedules_follow_their_formulas():
    (karras,) = cs.KarrasScheduler().get_sigmas(6, 14.614642, 0.0291675, 7.0)
    ramp = np.linspace(0, 1, 6)
    lo, hi = 0.0291675 ** (1 / 7), 14.614642 ** (1 / 7)
    want = np.append((hi + ramp * (lo - hi)) ** 7, 0.0)
    assert np.allclose(karras.numpy(), want, rtol=1e-5), np.abs(karras.numpy() - want).max()
    (exponential,) = cs.ExponentialScheduler().get_sigmas(5, 10.0, 0.1)
    want = np.append(np.exp(np.linspace(math.log(10.0), math.log(0.1), 5)), 0.0)
    assert np.allclose(exponential.numpy(), want, rtol=1e-5)


def test_split_sigmas_share_the_split_step():
    sigmas = torch.tensor([9.0, 5.0, 2.0, 1.0, 0.0])
    high, low = cs.SplitSigmas().get_sigmas(sigmas, 2)
    assert high.tolist() == [9.0, 5.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]
    high, low = cs.SplitSigmas().get_sigmas(sigmas, 0)
    assert high.tolist() == [9.0] and torch.equal(low, sigmas)


def test_noise_values():
    latent = {"samples": torch.zeros(2, 4, 8, 8), "batch_index": [3, 1]}
    (random,) = cs.RandomNoise().get_noise(42)
    assert torch.equal(random.generate(latent), ksampler.prepare_noise(latent["samples"], 42, [3, 1]))
    assert random.sampler_seed == 42
    (disabled,) = cs.DisableNoise().get_noise()
    assert torch.equal(disabled.generate(latent), torch.zeros(2, 4, 8, 8)) and disabled.sampler_seed == 0


def test_object_info_matches_comfyui():
    registry = NodeRegistry()
    registry.register_module("nodes.custom_sampling")
    custom = registry.object_info("SamplerCustom")
    assert custom["output"] == ["LATENT", "LATENT"] and custom["output_name"] == ["output", "denoised_output"]
    assert custom["input_order"]["required"] == ["model", "add_noise", "noise_seed", "cfg", "positive", "negative",
                                                 "sampler", "sigmas", "latent_image"]
    assert custom["category"] == "sampling/custom_sampling"
    advanced = registry.object_info("SamplerCustomAdvanced")
    assert advanced["input_order"]["required"] == ["noise", "guider", "sampler", "sigmas", "latent_image"]
    assert registry.object_info("SplitSigmas")["output_name"] == ["high_sigmas", "low_sigmas"]
    karras = registry.object_info("KarrasScheduler")["input"]["required"]
    assert karras["sigma_max"][1]["default"] == 14.614642 and karras["rho"][1]["default"] == 7.0
    categories = {"KSamplerSelect": "samplers", "BasicScheduler": "schedulers", "ExponentialScheduler": "schedulers",
                  "CFGGuider": "guiders", "BasicGuider": "guiders", "RandomNoise": "noise", "DisableNoise": "noise"}
    for name, leaf in categories.items():
        assert registry.object_info(name)["category"] == f"sampling/custom_sampling/{leaf}", name
    assert registry.object_info("DisableNoise")["output"] == ["NOISE"]


# ---------------------------------------------------------------------------------------------------------------
# against KSampler, end to end
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(folder, "sd1")
    return folder


@pytest.fixture
def settings(tmp_path, checkpoints) -> Settings:
    return settings_with_checkpoints(tmp_path, checkpoints)


def graph(**nodes) -> dict:
    """A prompt: the checkpoint, two prompts, a 64x48 latent (batch 2), and the given nodes."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd1.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 2}},
        **nodes,
    }


def save(name: str, source: list) -> dict:
    return {"class_type": "SaveLatent", "inputs": {"samples": source, "filename_prefix": f"latents/{name}"}}


def ksampler_node(latent=("empty", 0), seed=7, steps=4, cfg=5.0, sampler="euler_ancestral", scheduler="karras",
                  denoise=1.0) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
        "denoise": denoise, "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0],
        "latent_image": list(latent)}}


def run(client, prompt: dict) -> dict[str, torch.Tensor]:
    """Run a prompt and read back every latent its SaveLatent nodes wrote, by node id."""
    response = client.post("/api/v1/prompts", json=prompt)
    assert response.status_code in (200, 204), response.text
    outputs = list(client.get("/history").json().values())[-1]["outputs"]
    root = client.app.state.executor.folders.output
    return {node: load_file(str(root / out["latents"][0]["subfolder"] / out["latents"][0]["filename"]))[
        "latent_tensor"] for node, out in outputs.items() if "latents" in out}


@pytest.mark.parametrize("sampler,scheduler,denoise", [("euler_ancestral", "karras", 1.0),
                                                       ("dpmpp_2m", "normal", 0.6), ("ddim", "simple", 1.0)])
def test_sampler_custom_equals_ksampler(client, sampler, scheduler, denoise):
    prompt = graph(
        ks=ksampler_node(sampler=sampler, scheduler=scheduler, denoise=denoise),
        select={"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}},
        sched={"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": scheduler, "steps": 4,
                                                          "denoise": denoise}},
        custom={"class_type": "SamplerCustom", "inputs": {
            "model": ["ckpt", 0], "add_noise": True, "noise_seed": 7, "cfg": 5.0, "positive": ["pos", 0],
            "negative": ["neg", 0], "sampler": ["select", 0], "sigmas": ["sched", 0], "latent_image": ["empty", 0]}},
        a=save("ksampler", ["ks", 0]), b=save("custom", ["custom", 0]), c=save("denoised", ["custom", 1]),
    )
    latents = run(client, prompt)
    assert torch.equal(latents["a"], latents["b"])
    # the last step goes to sigma 0, so the final latent is the last denoised prediction (up to rounding)
    err = (latents["c"] - latents["b"]).abs().max().item()
    assert err < 1e-4, f"max abs difference output vs denoised_output {err:.2e}"


def test_sampler_custom_advanced_with_cfg_guider_equals_ksampler(client):
    prompt = graph(
        ks=ksampler_node(sampler="dpmpp_sde", scheduler="normal"),
        noise={"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        guider={"class_type": "CFGGuider", "inputs": {"model": ["ckpt", 0], "positive": ["pos", 0],
                                                      "negative": ["neg", 0], "cfg": 5.0}},
        select={"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_sde"}},
        sched={"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": "normal", "steps": 4,
                                                          "denoise": 1.0}},
        adv={"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["select", 0], "sigmas": ["sched", 0],
            "latent_image": ["empty", 0]}},
        a=save("ksampler", ["ks", 0]), b=save("advanced", ["adv", 0]),
    )
    latents = run(client, prompt)
    assert torch.equal(latents["a"], latents["b"])


def test_basic_guider_is_cfg_one_and_ignores_any_negative(client):
    common = dict(
        noise={"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        select={"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        sched={"class_type": "KarrasScheduler", "inputs": {"steps": 3, "sigma_max": 14.614642,
                                                           "sigma_min": 0.0291675, "rho": 7.0}},
    )
    basic = graph(**common, guider={"class_type": "BasicGuider", "inputs": {"model": ["ckpt", 0],
                                                                           "conditioning": ["pos", 0]}},
                  adv={"class_type": "SamplerCustomAdvanced", "inputs": {
                      "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["select", 0],
                      "sigmas": ["sched", 0], "latent_image": ["empty", 0]}},
                  out=save("basic", ["adv", 0]))
    cfg_one = graph(**common, guider={"class_type": "CFGGuider", "inputs": {
                        "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["pos", 0], "cfg": 1.0}},
                    adv=basic["adv"], out=save("cfg_one", ["adv", 0]))
    assert torch.equal(run(client, basic)["out"], run(client, cfg_one)["out"])


def test_disable_noise_equals_ksampler_advanced_without_noise(client):
    prompt = graph(
        ks={"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["ckpt", 0], "add_noise": "disable", "noise_seed": 0, "steps": 3, "cfg": 5.0,
            "sampler_name": "euler_ancestral", "scheduler": "karras", "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["empty", 0], "start_at_step": 0, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        noise={"class_type": "DisableNoise", "inputs": {}},
        guider={"class_type": "CFGGuider", "inputs": {"model": ["ckpt", 0], "positive": ["pos", 0],
                                                      "negative": ["neg", 0], "cfg": 5.0}},
        select={"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}},
        sched={"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": "karras", "steps": 3,
                                                          "denoise": 1.0}},
        adv={"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["select", 0], "sigmas": ["sched", 0],
            "latent_image": ["empty", 0]}},
        a=save("ksampler", ["ks", 0]), b=save("advanced", ["adv", 0]),
    )
    latents = run(client, prompt)
    assert torch.equal(latents["a"], latents["b"])  # zero noise, and seed 0 for the ancestral steps


def test_split_sigmas_chain_like_one_run(client):
    sampler = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    guider = {"class_type": "CFGGuider", "inputs": {"model": ["ckpt", 0], "positive": ["pos", 0],
                                                    "negative": ["neg", 0], "cfg": 5.0}}

    def advanced(noise, sigmas, latent):
        return {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": [noise, 0], "guider": ["guider", 0], "sampler": ["select", 0], "sigmas": sigmas,
            "latent_image": latent}}

    prompt = graph(
        select=sampler, guider=guider,
        noise={"class_type": "RandomNoise", "inputs": {"noise_seed": 11}},
        quiet={"class_type": "DisableNoise", "inputs": {}},
        sched={"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": "normal", "steps": 5,
                                                          "denoise": 1.0}},
        split={"class_type": "SplitSigmas", "inputs": {"sigmas": ["sched", 0], "step": 2}},
        whole=advanced("noise", ["sched", 0], ["empty", 0]),
        first=advanced("noise", ["split", 0], ["empty", 0]),
        second=advanced("quiet", ["split", 1], ["first", 0]),
        a=save("whole", ["whole", 0]), b=save("chained", ["second", 0]), c=save("high", ["first", 0]),
        d=save("high_denoised", ["first", 1]),
    )
    latents = run(client, prompt)
    err = (latents["a"] - latents["b"]).abs().max().item()
    # the hand-over scales the latent out of model space and back in (a rounding step), which the later steps
    # carry on: 8.4e-05 observed on CPU, where a broken hand-over is off by the order of the latent itself
    assert err < 5e-4, f"max abs error of the chained run {err:.2e}"
    assert (latents["c"] - latents["d"]).abs().max() > 0.01  # half-way, the latent still holds noise
