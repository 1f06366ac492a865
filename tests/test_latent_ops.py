"""Latent operations (nodes/latent_ops.py) against direct computations, latent files in ComfyUI's format, and the
nodes end to end through the HTTP app."""
from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.context import NodeContext
from engine.folders import Folders
from engine.registry import NodeRegistry
from engine.settings import Settings
from nodes import latent_ops as ops
from tests.tiny_models import write_checkpoint


def latent(batch=1, h=8, w=8, seed=0, **extra) -> dict:
    return {"samples": torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed)), **extra}


def test_composite_pastes_and_clips_at_the_edges():
    to, source = latent(h=8, w=8), latent(h=4, w=6, seed=1)
    (out,) = ops.LatentComposite().composite(to, source, x=32, y=16)  # latent offset (4, 2)
    want = to["samples"].clone()
    want[:, :, 2:6, 4:8] = source["samples"][:, :, :, :4]  # cut at the right edge
    assert torch.equal(out["samples"], want) and torch.equal(to["samples"], latent(h=8, w=8)["samples"])


def test_composite_feathers_inner_edges():
    to, source = latent(h=12, w=12), latent(h=6, w=6, seed=1)
    (out,) = ops.LatentComposite().composite(to, source, x=24, y=0, feather=16)  # offset (3, 0), feather 2
    ramp = np.array([0.5, 1.0, 1.0, 1.0, 1.0, 0.5])  # left and right edges lie inside; the top is the border
    rows = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.5])  # ... and the bottom edge lies inside
    weight = torch.tensor(np.outer(rows, ramp), dtype=torch.float32)
    want = to["samples"].clone()
    want[:, :, 0:6, 3:9] = source["samples"] * weight + to["samples"][:, :, 0:6, 3:9] * (1 - weight)
    err = (out["samples"] - want).abs().max().item()
    assert err < 1e-6, f"max abs error {err:.2e}"


def test_composite_masked_blends_by_the_resized_mask():
    destination, source = latent(h=8, w=8, noise_mask=torch.ones(1, 1, 64, 64)), latent(h=4, w=4, seed=1)
    mask = torch.rand(1, 32, 32)
    (out,) = ops.LatentCompositeMasked().composite(destination, source, x=16, y=40, resize_source=False, mask=mask)
    m = F.interpolate(mask.view(1, 1, 32, 32), size=(4, 4), mode="bilinear")[:, :, :3, :]  # 3 rows stay inside
    want = destination["samples"].clone()
    want[:, :, 5:8, 2:6] = m * source["samples"][:, :, :3] + (1 - m) * want[:, :, 5:8, 2:6]
    err = (out["samples"] - want).abs().max().item()
    assert err < 1e-6, f"max abs error {err:.2e}"
    assert out["noise_mask"] is destination["noise_mask"]
    (resized,) = ops.LatentCompositeMasked().composite(destination, source, x=0, y=0, resize_source=True)
    assert torch.equal(resized["samples"], F.interpolate(source["samples"], size=(8, 8), mode="bilinear"))


def test_blend():
    a, b = latent(seed=1), latent(seed=2)
    (out,) = ops.LatentBlend().blend(a, b, 0.3)
    assert torch.allclose(out["samples"], a["samples"] * 0.3 + b["samples"] * 0.7)
    small = latent(h=4, w=4, seed=3)
    (out,) = ops.LatentBlend().blend(a, small, 0.5)
    upscaled = F.interpolate(small["samples"], size=(8, 8), mode="bicubic")
    assert torch.allclose(out["samples"], a["samples"] * 0.5 + upscaled * 0.5)


@pytest.mark.parametrize("rotation,turns", [("none", 0), ("90 degrees", 1), ("180 degrees", 2), ("270 degrees", 3)])
def test_rotate_turns_clockwise(rotation, turns):
    source = latent(h=4, w=6)
    (out,) = ops.LatentRotate().rotate(source, rotation)
    want = source["samples"]
    for _ in range(turns):  # one clockwise quarter turn: new[i, j] = old[H - 1 - j, i]
        want = want.transpose(2, 3).flip(3)
    assert torch.equal(out["samples"], want)


def test_flip():
    source = latent()
    (vertical,) = ops.LatentFlip().flip(source, "x-axis: vertically")
    (horizontal,) = ops.LatentFlip().flip(source, "y-axis: horizontally")
    assert torch.equal(vertical["samples"][:, :, 0], source["samples"][:, :, -1])  # rows reversed
    assert torch.equal(vertical["samples"][:, :, 2], source["samples"][:, :, -3])
    assert torch.equal(horizontal["samples"][..., 0], source["samples"][..., -1])  # columns reversed
    assert torch.equal(horizontal["samples"][..., 5], source["samples"][..., -6])


def test_crop_keeps_at_least_eight_latent_pixels():
    source = latent(h=16, w=20)
    (out,) = ops.LatentCrop().crop(source, width=64, height=96, x=16, y=8)
    assert torch.equal(out["samples"], source["samples"][:, :, 1:13, 2:10])
    (out,) = ops.LatentCrop().crop(source, width=512, height=512, x=1000, y=1000)
    assert torch.equal(out["samples"], source["samples"][:, :, 8:, 12:])  # offset held 8 latent pixels inside


def test_add_subtract_multiply():
    a, b = latent(batch=2, seed=1), latent(seed=2)
    (total,) = ops.LatentAdd().op(a, b)
    assert torch.equal(total["samples"], a["samples"] + b["samples"].repeat(2, 1, 1, 1))
    (diff,) = ops.LatentSubtract().op(a, b)
    assert torch.equal(diff["samples"], a["samples"] - b["samples"].repeat(2, 1, 1, 1))
    (scaled,) = ops.LatentMultiply().op(a, -2.5)
    assert torch.equal(scaled["samples"], a["samples"] * -2.5)
    other = latent(h=4, w=16, seed=3)  # another size: centre-cropped to the aspect, then bilinear
    (total,) = ops.LatentAdd().op(a, other)
    resized = F.interpolate(other["samples"][:, :, :, 6:10], size=(8, 8), mode="bilinear")
    assert torch.equal(total["samples"], a["samples"] + resized.repeat(2, 1, 1, 1))


def test_interpolate_mixes_directions_and_norms():
    a, b = latent(seed=1), latent(seed=2)
    (out,) = ops.LatentInterpolate().op(a, b, 0.25)
    s1, s2 = a["samples"][0], b["samples"][0]  # (C, H, W): per pixel
    n1, n2 = s1.norm(dim=0), s2.norm(dim=0)
    direction = s1 / n1 * 0.25 + s2 / n2 * 0.75
    want = direction / direction.norm(dim=0) * (n1 * 0.25 + n2 * 0.75)
    err = (out["samples"][0] - want).abs().max().item()
    assert err < 1e-5, f"max abs error {err:.2e}"
    (same,) = ops.LatentInterpolate().op(a, b, 1.0)
    assert torch.allclose(same["samples"], a["samples"], atol=1e-6)


def test_batch_concatenates_and_tracks_indices():
    a, b = latent(batch=2, batch_index=[4, 5]), latent(h=4, w=4, seed=2)
    (out,) = ops.LatentBatch().batch(a, b)
    assert out["samples"].shape == (3, 4, 8, 8) and torch.equal(out["samples"][:2], a["samples"])
    assert torch.equal(out["samples"][2:], F.interpolate(b["samples"], size=(8, 8), mode="bilinear"))
    assert out["batch_index"] == [4, 5, 0]


def test_batch_seed_behavior():
    source = latent(batch=3, batch_index=[7, 8, 9])
    (fixed,) = ops.LatentBatchSeedBehavior().op(source, "fixed")
    assert fixed["batch_index"] == [7, 7, 7]
    (random,) = ops.LatentBatchSeedBehavior().op(source, "random")
    assert "batch_index" not in random and source["batch_index"] == [7, 8, 9]
    (fresh,) = ops.LatentBatchSeedBehavior().op(latent(batch=2), "fixed")
    assert fresh["batch_index"] == [0, 0]


# ---------------------------------------------------------------------------------------------------------------
# latent files
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def context(tmp_path) -> NodeContext:
    folders = Folders(tmp_path / "input", tmp_path / "output", tmp_path / "temp")
    folders.ensure()
    return NodeContext(folders=folders)


def test_save_latent_writes_comfyui_files(context):
    samples = latent(batch=2)
    prompt = {"1": {"class_type": "SaveLatent"}}
    result = ops.SaveLatent().save(samples, context, "latents/run", prompt, {"workflow": {"a": 1}})
    entry = result["ui"]["latents"][0]
    assert entry == {"filename": "run_00001_.latent", "subfolder": "latents", "type": "output"}
    path = context.folders.output / "latents" / "run_00001_.latent"
    tensors = load_file(str(path))
    assert set(tensors) == {"latent_tensor", "latent_format_version_0"}
    assert torch.equal(tensors["latent_tensor"], samples["samples"]) and tensors["latent_format_version_0"].numel() == 0
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata() == {"prompt": json.dumps(prompt), "workflow": json.dumps({"a": 1})}
    second = ops.SaveLatent().save(samples, context, "latents/run")
    assert second["ui"]["latents"][0]["filename"] == "run_00002_.latent"
    assert [p.name for p in (context.folders.output / "latents").iterdir()] != []
    assert not any(p.name.startswith(".") for p in (context.folders.output / "latents").iterdir())  # no temp left


def test_save_latent_refuses_a_prefix_outside_the_output_folder(context):
    assert ops.SaveLatent.VALIDATE_INPUTS(context, "../escape") is not True
    assert ops.SaveLatent.VALIDATE_INPUTS(context, "latents/ok") is True


def test_load_latent_round_trip_and_legacy_scale(context):
    samples = latent(batch=2, seed=4)["samples"]
    (context.folders.input / "new.latent").write_bytes(ops.latent_file_bytes(samples))
    save_file({"latent_tensor": samples.half()}, str(context.folders.input / "old.latent"))  # ComfyUI's first format
    (context.folders.input / "note.txt").write_text("not a latent")
    assert ops.LoadLatent.INPUT_TYPES(context)["required"]["latent"] == [["new.latent", "old.latent"]]
    (loaded,) = ops.LoadLatent().load("new.latent", context)
    assert torch.equal(loaded["samples"], samples)
    (legacy,) = ops.LoadLatent().load("old.latent", context)
    assert torch.equal(legacy["samples"], samples.half().float() * (1.0 / 0.18215))
    assert ops.LoadLatent.VALIDATE_INPUTS("missing.latent", context) is not True
    assert ops.LoadLatent.IS_CHANGED("new.latent", context) != ops.LoadLatent.IS_CHANGED("old.latent", context)


def test_object_info_matches_comfyui():
    registry = NodeRegistry()
    registry.register_module("nodes.latent_ops")
    expected = {"LatentComposite": "latent", "LatentCompositeMasked": "latent", "LatentBlend": "_for_testing",
                "LatentRotate": "latent/transform", "LatentFlip": "latent/transform", "LatentCrop": "latent/transform",
                "LatentAdd": "latent/advanced", "LatentSubtract": "latent/advanced",
                "LatentMultiply": "latent/advanced", "LatentInterpolate": "latent/advanced",
                "LatentBatch": "latent/batch", "LatentBatchSeedBehavior": "latent/advanced",
                "SaveLatent": "_for_testing", "LoadLatent": "_for_testing"}
    for name, category in expected.items():
        assert registry.object_info(name)["category"] == category, name
    masked = registry.object_info("LatentCompositeMasked")
    assert masked["input_order"] == {"required": ["destination", "source", "x", "y", "resize_source"],
                                     "optional": ["mask"]}
    assert registry.object_info("SaveLatent")["output_node"] is True
    assert registry.object_info("LatentBatchSeedBehavior")["input"]["required"]["seed_behavior"][1] == \
        {"default": "fixed"}


# ---------------------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", max_queue=8)
    write_checkpoint(settings.models_dir / "checkpoints", "sd1")
    return settings


def test_latent_nodes_end_to_end(client, settings):
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "2": {"class_type": "LatentMultiply", "inputs": {"samples": ["1", 0], "multiplier": 2.0}},
        "3": {"class_type": "LatentRotate", "inputs": {"samples": ["2", 0], "rotation": "90 degrees"}},
        "4": {"class_type": "LatentBatchSeedBehavior", "inputs": {"samples": ["3", 0], "seed_behavior": "fixed"}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "latents/e2e"}},
    }
    response = client.post("/api/v1/prompts", json=prompt)
    assert response.status_code == 204, response.text  # no image
    outputs = list(client.get("/history").json().values())[-1]["outputs"]
    entry = outputs["5"]["latents"][0]
    path = settings.output_dir / entry["subfolder"] / entry["filename"]
    assert torch.equal(load_file(str(path))["latent_tensor"], torch.zeros(2, 4, 8, 8))
    (settings.input_dir / "again.latent").write_bytes(path.read_bytes())
    sampled = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd1.safetensors"}},
        "2": {"class_type": "LoadLatent", "inputs": {"latent": "again.latent"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "4": {"class_type": "KSampler", "inputs": {
            "seed": 1, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["2", 0]}},
        "5": {"class_type": "LatentFlip", "inputs": {"samples": ["4", 0], "flip_method": "y-axis: horizontally"}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "from_latent"}},
    }
    response = client.post("/api/v1/prompts", json=sampled)
    assert response.status_code == 200, response.text
    assert len(response.json()["outputs"]["7"]["images"]) == 2
