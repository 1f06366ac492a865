"""Stable Diffusion inference end to end on tiny random checkpoints of each family, through the real loaders,
nodes and HTTP routes."""
from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.settings import Settings
from nodes.sampling import SAMPLER_NAMES, SCHEDULER_NAMES
from tests.conftest import settings_with_checkpoints
from tests.tiny_models import FAMILIES, checkpoint_state_dict, write_checkpoint

PNG = {"Accept": "image/png"}
TEMPORAL = {"temporal_size": 64, "temporal_overlap": 8}  # required by ComfyUI's tiled VAE nodes, unused for images


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoints")
    for family in FAMILIES:
        write_checkpoint(folder, family)
    return folder


@pytest.fixture
def settings(tmp_path, checkpoints) -> Settings:
    return settings_with_checkpoints(tmp_path, checkpoints)


def txt2img(family="sd1", seed=1, sampler="euler", scheduler="normal", steps=3, width=64, height=48, batch=1,
            prefix="out", text="a (red:1.2) cat"):
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"tiny_{family}.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


def image_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_gives_an_image_of_the_requested_size(client, family):
    pixels = image_of(client.post("/api/v1/prompts", json=txt2img(family, width=72, height=40), headers=PNG))
    assert pixels.shape == (40, 72, 3)
    assert pixels.std() > 0  # not a blank image


def test_same_prompt_gives_identical_bytes_on_a_fresh_executor(make_client, settings):
    prompt = txt2img("sdxl")
    first = make_client(settings).post("/api/v1/prompts", json=prompt, headers=PNG)
    again = make_client(Settings(data_dir=settings.data_dir, cache_size=0)).post(
        "/api/v1/prompts", json=prompt, headers={**PNG, "Cache-Control": "no-cache"})
    assert first.status_code == again.status_code == 200
    assert first.content == again.content
    assert not np.array_equal(image_of(first), image_of(make_client(settings).post(
        "/api/v1/prompts", json=txt2img("sdxl", seed=2), headers=PNG)))


def test_changing_the_seed_reruns_only_the_sampler_and_what_follows(client):
    client.post("/api/v1/prompts", json=txt2img())
    client.post("/api/v1/prompts", json=txt2img(seed=99))
    runs = list(client.get("/history").json().values())
    messages = dict((event, data) for event, data in runs[-1]["status"]["messages"])
    assert sorted(messages["execution_cached"]["nodes"]) == ["4", "5", "6", "7"]


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_runs(client, sampler):
    pixels = image_of(client.post("/api/v1/prompts", json=txt2img(sampler=sampler, steps=4), headers=PNG))
    assert pixels.shape == (48, 64, 3)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_runs(client, scheduler):
    assert image_of(client.post("/api/v1/prompts", json=txt2img(scheduler=scheduler), headers=PNG)).ndim == 3


def test_sdxl_two_stage_base_then_refiner(client):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sdxl.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sdxl_refiner.safetensors"}},
        "3": {"class_type": "CLIPTextEncodeSDXL", "inputs": {
            "clip": ["1", 1], "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024,
            "target_height": 1024, "text_g": "a castle", "text_l": "watercolor"}},
        "4": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "5": {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {
            "clip": ["2", 1], "ascore": 6.0, "width": 1024, "height": 1024, "text": "a castle"}},
        "6": {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {
            "clip": ["2", 1], "ascore": 2.5, "width": 1024, "height": 1024, "text": ""}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["1", 0], "add_noise": "enable", "noise_seed": 5, "steps": 6, "cfg": 5.0,
            "sampler_name": "dpmpp_2m", "scheduler": "karras", "positive": ["3", 0], "negative": ["4", 0],
            "latent_image": ["7", 0], "start_at_step": 0, "end_at_step": 4, "return_with_leftover_noise": "enable"}},
        "9": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["2", 0], "add_noise": "disable", "noise_seed": 5, "steps": 6, "cfg": 5.0,
            "sampler_name": "dpmpp_2m", "scheduler": "karras", "positive": ["5", 0], "negative": ["6", 0],
            "latent_image": ["8", 0], "start_at_step": 4, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["2", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "refined"}},
    }
    assert image_of(client.post("/api/v1/prompts", json=prompt, headers=PNG)).shape == (64, 64, 3)


def test_img2img_latent_nodes_and_tiled_vae(client):
    prompt = txt2img(batch=2)
    prompt.update({
        "10": {"class_type": "VAEEncodeTiled", "inputs": {"pixels": ["8", 0], "vae": ["4", 2], "tile_size": 64,
                                                          "overlap": 16, **TEMPORAL}},
        "11": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["10", 0], "upscale_method": "bislerp",
                                                           "scale_by": 1.5}},
        "12": {"class_type": "LatentFromBatch", "inputs": {"samples": ["11", 0], "batch_index": 1, "length": 1}},
        "13": {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["12", 0], "amount": 2}},
        "14": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -2}},
        "15": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog", "clip": ["14", 0]}},
        "16": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["15", 0],
                                                               "conditioning_2": ["6", 0]}},
        "17": {"class_type": "KSampler", "inputs": {
            "seed": 3, "steps": 4, "cfg": 3.0, "sampler_name": "dpmpp_sde", "scheduler": "karras",
            "denoise": 0.5, "model": ["4", 0], "positive": ["16", 0], "negative": ["7", 0],
            "latent_image": ["13", 0]}},
        "18": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["17", 0], "vae": ["4", 2], "tile_size": 64,
                                                          "overlap": 32, **TEMPORAL}},
        "19": {"class_type": "SaveImage", "inputs": {"images": ["18", 0], "filename_prefix": "img2img"}},
    })
    response = client.post("/api/v1/prompts", json=prompt)
    assert response.status_code == 200, response.text
    files = response.json()["outputs"]["19"]["images"]
    assert len(files) == 2
    saved = Image.open(Path(client.app.state.executor.folders.output) / files[0]["filename"])
    assert saved.size == (96, 72)  # 64x48 scaled by 1.5


def test_vae_loader_reads_a_standalone_vae(client, settings):
    sd = checkpoint_state_dict("sd1")
    vae = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    (settings.models_dir / "vae").mkdir()
    save_file(vae, str(settings.models_dir / "vae" / "tiny_vae.safetensors"))
    prompt = txt2img()
    prompt["10"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_vae.safetensors"}}
    prompt["8"]["inputs"]["vae"] = ["10", 0]
    with_loader = image_of(client.post("/api/v1/prompts", json=prompt, headers=PNG))
    assert np.array_equal(with_loader, image_of(client.post("/api/v1/prompts", json=txt2img(), headers=PNG)))


def test_unknown_checkpoint_is_a_validation_error(client):
    response = client.post("/api/v1/prompts", json=txt2img(family="nope"))
    assert response.status_code == 400
    error = response.json()["node_errors"]["4"]["errors"][0]
    assert "tiny_nope.safetensors" in error["details"] and "checkpoints" in error["details"]


def test_a_file_that_is_not_a_checkpoint_is_a_clear_400(client, settings, tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, str(bogus))
    local = settings.data_dir / "models" / "other"
    local.mkdir(parents=True)
    (settings.models_dir / "checkpoints" / "bogus.safetensors").unlink(missing_ok=True)
    prompt = txt2img()
    prompt["4"]["inputs"]["ckpt_name"] = "bogus.safetensors"
    (Path(settings.models_dir / "checkpoints").resolve() / "bogus.safetensors").write_bytes(bogus.read_bytes())
    try:
        response = client.post("/api/v1/prompts", json=prompt)
    finally:
        (Path(settings.models_dir / "checkpoints").resolve() / "bogus.safetensors").unlink()
    assert response.status_code == 400
    message = response.json()["error"]["exception_message"]
    assert "bogus.safetensors" in message and "some.weight" in message


def test_object_info_lists_samplers_schedulers_and_checkpoints(client):
    info = client.get("/object_info/KSampler").json()["KSampler"]["input"]["required"]
    assert info["sampler_name"][0] == SAMPLER_NAMES
    assert info["scheduler"][0] == SCHEDULER_NAMES
    loader = client.get("/object_info/CheckpointLoaderSimple").json()["CheckpointLoaderSimple"]
    assert set(loader["input"]["required"]["ckpt_name"][0]) >= {f"tiny_{f}.safetensors" for f in FAMILIES}
    assert loader["output"] == ["MODEL", "CLIP", "VAE"]


def test_sampling_reports_progress_and_stops_on_interrupt(client):
    prompt = txt2img(steps=400, width=256, height=256)
    answers = []
    with client.websocket_connect("/ws?clientId=me") as ws:
        worker = threading.Thread(target=lambda: answers.append(
            client.post("/api/v1/prompts", json={"prompt": prompt, "client_id": "me"})))
        worker.start()
        while True:
            message = ws.receive_json()
            if message["type"] == "progress" and message["data"]["node"] == "3":
                break
        assert message["data"]["max"] == 400
        started = time.monotonic()
        client.post("/interrupt")
        worker.join(60)
    assert answers[0].status_code == 500
    assert answers[0].json()["error"]["type"] == "execution_interrupted"
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_sde"])
def test_largest_seed_is_accepted(client, sampler):
    prompt = txt2img(sampler=sampler, seed=0xFFFFFFFFFFFFFFFF)
    assert image_of(client.post("/api/v1/prompts", json=prompt, headers=PNG)).shape == (48, 64, 3)
