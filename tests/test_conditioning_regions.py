"""Regional and scheduled conditioning: areas, masks, strengths and timestep ranges as the sampler applies them
(engine/sampling/guidance.py), the option translation (engine/inpaint.py) and the conditioning nodes
(nodes/conditioning_regions.py), checked against direct computations, then end to end through the HTTP app."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.diffusion import DiffusionModel
from engine.inpaint import cond_options_to_fields, mask_bounds, resolve_area
from engine.models.unet import UNetModel
from engine.registry import NodeRegistry
from engine.sampling.guidance import Cond, cfg_model, with_opposite_areas
from engine.sampling.model_sampling import SD15_LATENT, ModelSampling
from engine.settings import Settings
from nodes import conditioning_regions as regions
from tests.conftest import settings_with_checkpoints
from tests.tiny_models import randomize, sd1_unet, write_checkpoint

H = W = 16


class Encoding:
    """A toy denoiser whose prediction is, at every pixel, the mean of its cross-attention context: the output
    says which cond produced it. Records every call."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, x, sigma, cross_attn, y, concat=None):
        self.calls.append({"x": x, "sigma": sigma, "cross_attn": cross_attn, "concat": concat})
        return torch.zeros_like(x) + cross_attn.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def ctx(value: float, length: int = 77) -> torch.Tensor:
    return torch.full((1, length, 8), value)


def feather(size: int, offset: int, full: int) -> np.ndarray:
    """The weights along one side of an area without a mask, written out from ComfyUI's description: a linear
    ramp (t + 1) / r over r = min(8, size // 4) pixels at each edge that lies inside the latent."""
    weights = np.ones(size)
    ramp = min(8, size // 4)
    for t in range(ramp):
        if offset != 0:
            weights[t] *= (t + 1) / ramp
        if offset + size < full:
            weights[size - 1 - t] *= (t + 1) / ramp
    return weights


def area_weights(area: tuple[int, int, int, int]) -> torch.Tensor:
    """(H, W) weight of an area cond over the whole latent: feathered inside the area, 0 outside."""
    h, w, y, x = area
    h, w = min(H - y, h), min(W - x, w)
    full = np.zeros((H, W))
    full[y:y + h, x:x + w] = np.outer(feather(h, y, H), feather(w, x, W))
    return torch.tensor(full, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# areas
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("area", [(8, 8, 4, 4), (8, 8, 12, 12), (16, 6, 0, 3), (4, 16, 0, 0)])
def test_an_area_cond_changes_only_its_area(area):
    x, sigma = torch.randn(1, 4, H, W), torch.tensor([2.0])
    negative = [Cond(ctx(0.0))]
    out = cfg_model(Encoding(), [Cond(ctx(1.0)), Cond(ctx(5.0), area=area)], negative, 7.5)(x, sigma)
    baseline = cfg_model(Encoding(), [Cond(ctx(1.0))], negative, 7.5)(x, sigma)
    weight = area_weights(area)
    outside = (weight == 0).expand_as(out)
    assert torch.equal(out[outside], baseline[outside])
    # inside: the weighted mean of the two conds; the uncond inside the area is its mirrored copy (value 0)
    expected = (1.0 + 5.0 * weight) / (1.0 + weight) * 7.5
    err = (out - expected).abs().max().item()
    assert err < 1e-5, f"max abs error {err:.2e}"


def test_with_a_real_unet_an_area_leaves_the_prediction_outside_it_bit_identical():
    unet_config = sd1_unet()
    unet = UNetModel(unet_config)
    unet.load_state_dict(randomize(unet, torch.Generator().manual_seed(0)), assign=True)
    model = DiffusionModel(unet.eval(), ModelSampling(), SD15_LATENT, "sd1")
    x, sigma = torch.randn(1, 4, H, W) * 3.0, torch.tensor([3.0])
    text = torch.Generator().manual_seed(1)
    pos, region, neg = (torch.randn(1, 77, 64, generator=text) for _ in range(3))
    area = (8, 8, 8, 0)
    with torch.no_grad():
        out = cfg_model(model, [Cond(pos), Cond(region, area=area)], [Cond(neg)], 5.0)(x, sigma)
        baseline = cfg_model(model, [Cond(pos)], [Cond(neg)], 5.0)(x, sigma)
    outside = (area_weights(area) == 0).expand_as(out)
    assert torch.equal(out[outside], baseline[outside])
    assert not torch.equal(out[~outside], baseline[~outside])


def test_area_conds_batch_with_their_mirrored_uncond():
    rec = Encoding()
    x = torch.randn(2, 4, H, W)
    guided = cfg_model(rec, [Cond(ctx(1.0)), Cond(ctx(5.0), area=(8, 8, 4, 4))], [Cond(ctx(-1.0))], 3.0)
    guided(x, torch.full((2,), 1.5))
    assert len(rec.calls) == 2  # the full-size pair, then the area pair
    full, part = rec.calls
    assert full["x"].shape == (4, 4, H, W) and torch.equal(full["cross_attn"][:2], ctx(-1.0).repeat(2, 1, 1))
    assert part["x"].shape == (4, 4, 8, 8) and torch.equal(part["x"][:2], x[:, :, 4:12, 4:12])
    assert torch.equal(part["cross_attn"][:2], ctx(-1.0).repeat(2, 1, 1))  # the uncond's text, on the area
    assert torch.equal(part["cross_attn"][2:], ctx(5.0).repeat(2, 1, 1))


def test_opposite_areas_are_added_once_with_the_smallest_enclosing_text():
    big, small = Cond(ctx(2.0), area=(12, 12, 0, 0)), Cond(ctx(3.0), area=(4, 4, 2, 2), strength=0.5)
    positive, negative = with_opposite_areas([Cond(ctx(1.0)), small], [Cond(ctx(0.0)), big])
    # the negative gets small's area with big's text (big encloses it, the full cond is larger), keeping small's
    # strength; the positive gets big's area with its full cond's text
    assert len(negative) == 3 and negative[2].area == small.area and negative[2].strength == 0.5
    assert negative[2].cross_attn is big.cross_attn
    assert len(positive) == 3 and positive[2].area == big.area and positive[2].cross_attn is positive[0].cross_attn
    same = Cond(ctx(4.0), area=(4, 4, 2, 2))
    _, negative = with_opposite_areas([small], [same])
    assert len(negative) == 1  # an entry with exactly that area exists already


def test_area_crops_the_concat_and_uncovered_pixels_predict_zero():
    rec = Encoding()
    concat = torch.randn(1, 5, H, W)
    x = torch.randn(1, 4, H, W)
    out = cfg_model(rec, [Cond(ctx(2.0), area=(8, 8, 0, 0), concat=concat)], [], 1.0)(x, torch.tensor([1.0]))
    assert torch.equal(rec.calls[0]["concat"], concat[:, :, :8, :8])
    assert torch.equal(out[:, :, 8:, :], torch.zeros(1, 4, 8, W))  # no cond covers it: ComfyUI's 1e-37 guard


def test_an_area_starting_outside_the_latent_is_a_clear_error():
    with pytest.raises(ValueError, match="outside"):
        cfg_model(Encoding(), [Cond(ctx(1.0), area=(8, 8, 16, 0))], [], 1.0)(torch.randn(1, 4, H, W),
                                                                          torch.tensor([1.0]))


# ---------------------------------------------------------------------------------------------------------------
# masks and strengths
# ---------------------------------------------------------------------------------------------------------------


def test_masks_weight_their_cond_per_pixel():
    x = torch.randn(2, 4, H, W)
    mask = torch.zeros(1, H, W)
    mask[:, :, :8] = 1.0
    mask[:, 0, 0] = 0.25
    conds = [Cond(ctx(1.0)), Cond(ctx(5.0), mask=mask, mask_strength=0.5, strength=2.0)]
    out = cfg_model(Encoding(), conds, [], 1.0)(x, torch.full((2,), 1.0))
    weight = mask * 0.5 * 2.0  # no feathering with a mask
    expected = ((1.0 + 5.0 * weight) / (1.0 + weight)).unsqueeze(1).expand_as(out)
    err = (out - expected).abs().max().item()
    assert err < 1e-6, f"max abs error {err:.2e}"
    assert torch.equal(out[:, :, :, 8:], torch.ones(2, 4, H, 8))  # exactly the other cond where the mask is 0


def test_strength_weights_the_average():
    x = torch.randn(1, 4, H, W)
    out = cfg_model(Encoding(), [Cond(ctx(1.0)), Cond(ctx(4.0), strength=3.0)], [], 1.0)(x, torch.tensor([1.0]))
    assert torch.allclose(out, torch.full_like(out, (1.0 + 4.0 * 3.0) / 4.0))


def test_mask_options_are_resized_and_bounded():
    latent = torch.zeros(1, 4, H, W)
    mask = torch.zeros(1, 64, 64)
    mask[0, 20:30, 36:44] = 1.0
    fields = cond_options_to_fields({"mask": mask, "mask_strength": 0.7, "set_area_to_bounds": True}, latent,
                                    ModelSampling())
    resized = F.interpolate(mask.unsqueeze(1), size=(H, W), mode="bilinear").squeeze(1)
    assert torch.equal(fields["mask"], resized) and fields["mask_strength"] == 0.7
    rows, cols = torch.nonzero(resized[0], as_tuple=True)
    top, left = int(rows.min()), int(cols.min())
    assert fields["area"] == (8, 8, top, left)  # the bounding box is smaller than 8x8: grown to 8x8
    assert mask_bounds(torch.zeros(2, H, W)) == (8, 8, 0, 0)
    wide = torch.zeros(2, H, W)
    wide[0, 1:3, 2:14] = 1
    wide[1, 10:12, 3:4] = -1  # bounds cover every mask of the batch, by magnitude
    assert mask_bounds(wide) == (11, 12, 1, 2)
    plain = cond_options_to_fields({"mask": mask, "set_area_to_bounds": False}, latent, ModelSampling())
    assert "area" not in plain and plain["mask_strength"] == 1.0


def test_percentage_areas_resolve_against_the_latent():
    assert resolve_area(("percentage", 0.5, 0.25, 0.25, 0.5), 16, 20) == (8, 5, 4, 10)
    assert resolve_area(("percentage", 0.01, 0.0, 0.0, 0.0), 16, 20) == (1, 1, 0, 0)  # at least one pixel
    assert resolve_area(("percentage", 0.5, 0.5, 0.5, 0.5), 13, 13) == (6, 6, 6, 6)  # Python's round half even
    fields = cond_options_to_fields({"area": ("percentage", 1.0, 0.5, 0.0, 0.5), "strength": 0.3},
                                    torch.zeros(1, 4, 8, 12), ModelSampling())
    assert fields == {"area": (8, 6, 0, 6), "strength": 0.3}


# ---------------------------------------------------------------------------------------------------------------
# timestep ranges
# ---------------------------------------------------------------------------------------------------------------


def test_timestep_ranges_become_sigmas_and_skip_conds_outside_them():
    ms = ModelSampling()
    fields = cond_options_to_fields({"start_percent": 0.2, "end_percent": 0.6}, torch.zeros(1, 4, H, W), ms)
    start, end = fields["timestep_range"]
    assert start == ms.sigma(torch.tensor(0.8 * 999.0)).item() and end == ms.sigma(torch.tensor(0.4 * 999.0)).item()
    scheduled = Cond(ctx(5.0), **fields)
    x = torch.randn(1, 4, H, W)
    for sigma, used in [(start * 1.001, False), (start, True), (end * 1.001, True), (end, True),
                        (end * 0.999, False)]:
        rec = Encoding()
        out = cfg_model(rec, [Cond(ctx(1.0)), scheduled], [], 1.0)(x, torch.tensor([sigma]))
        assert rec.calls[0]["x"].shape[0] == (2 if used else 1)
        assert torch.allclose(out, torch.full_like(out, 3.0 if used else 1.0)), sigma


def test_the_full_range_never_skips():
    ms = ModelSampling()
    fields = cond_options_to_fields({"start_percent": 0.0, "end_percent": 1.0}, torch.zeros(1, 4, H, W), ms)
    assert fields["timestep_range"] == (999999999.9, 0.0)
    only_end = cond_options_to_fields({"end_percent": 0.5}, torch.zeros(1, 4, H, W), ms)["timestep_range"]
    assert only_end[0] == float("inf")
    rec = Encoding()
    cfg_model(rec, [Cond(ctx(1.0), **fields)], [], 1.0)(torch.randn(1, 4, H, W), torch.tensor([14.6]))
    assert len(rec.calls) == 1


# ---------------------------------------------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------------------------------------------


def test_conditioning_average_mixes_tokens_and_pooled_outputs():
    t1, t0 = torch.randn(1, 77, 8), torch.randn(1, 154, 8)
    p1, p0 = torch.randn(1, 8), torch.randn(1, 8)
    (out,) = regions.ConditioningAverage().addWeighted([[t1, {"pooled_output": p1, "x": 1}]],
                                                       [[t0, {"pooled_output": p0}]], 0.3)
    assert torch.allclose(out[0][0], t1 * 0.3 + t0[:, :77] * 0.7)
    assert torch.allclose(out[0][1]["pooled_output"], p1 * 0.3 + p0 * 0.7) and out[0][1]["x"] == 1
    short = torch.randn(1, 40, 8)
    (out,) = regions.ConditioningAverage().addWeighted([[t1, {}]], [[short, {}]], 0.25)
    padded = torch.cat([short, torch.zeros(1, 37, 8)], dim=1)  # the shorter "from" is zero-padded
    assert out[0][0].shape == (1, 77, 8) and torch.allclose(out[0][0], t1 * 0.25 + padded * 0.75)
    assert "pooled_output" not in out[0][1]
    (out,) = regions.ConditioningAverage().addWeighted([[t1, {}]], [[t0, {"pooled_output": p0}]], 0.3)
    assert torch.equal(out[0][1]["pooled_output"], p0 * 0.3 + p0 * 0.7)  # "to" without one mixes "from" with itself
    (out,) = regions.ConditioningAverage().addWeighted([[t1, {"pooled_output": None}]],
                                                       [[t0, {"pooled_output": p0}]], 0.3)
    assert out[0][1]["pooled_output"] is p0  # an explicit None takes "from"'s as it is


def test_conditioning_concat_appends_the_first_from_entry():
    a, b, c = torch.randn(1, 77, 8), torch.randn(1, 154, 8), torch.randn(1, 77, 8)
    options = {"pooled_output": torch.randn(1, 8)}
    (out,) = regions.ConditioningConcat().concat([[a, options]], [[b, {}], [c, {}]])
    assert len(out) == 1 and out[0][0].shape == (1, 231, 8) and torch.equal(out[0][0], torch.cat([a, b], 1))
    assert out[0][1] == options and out[0][1] is not options


def test_area_mask_and_range_nodes_write_comfyui_options():
    cond = [[ctx(1.0), {"pooled_output": None}]]
    (out,) = regions.ConditioningSetArea().append(cond, width=64, height=128, x=16, y=8, strength=0.5)
    assert out[0][1] == {"pooled_output": None, "area": (16, 8, 1, 2), "strength": 0.5, "set_area_to_bounds": False}
    assert cond[0][1] == {"pooled_output": None}  # the input is not modified
    (out,) = regions.ConditioningSetAreaPercentage().append(cond, width=0.5, height=0.25, x=0.1, y=0.2, strength=2.0)
    assert out[0][1]["area"] == ("percentage", 0.25, 0.5, 0.2, 0.1)
    (out,) = regions.ConditioningSetAreaStrength().append(out, strength=0.7)
    assert out[0][1]["strength"] == 0.7 and out[0][1]["area"][0] == "percentage"
    (out,) = regions.ConditioningSetMask().append(cond, torch.ones(8, 8), "mask bounds", 0.4)
    assert out[0][1]["mask"].shape == (1, 8, 8) and out[0][1]["set_area_to_bounds"] is True
    assert out[0][1]["mask_strength"] == 0.4
    (out,) = regions.ConditioningSetTimestepRange().set_range(cond, 0.1, 0.8)
    assert (out[0][1]["start_percent"], out[0][1]["end_percent"]) == (0.1, 0.8)


def test_object_info_matches_comfyui():
    registry = NodeRegistry()
    registry.register_module("nodes.conditioning_regions")
    info = registry.object_info("ConditioningSetArea")
    assert info["input_order"]["required"] == ["conditioning", "width", "height", "x", "y", "strength"]
    assert info["input"]["required"]["width"][1] == {"default": 64, "min": 64, "max": 16384, "step": 8}
    assert info["display_name"] == "Conditioning (Set Area)" and info["category"] == "conditioning"
    assert registry.object_info("ConditioningAverage")["display_name"] == "ConditioningAverage"
    mask = registry.object_info("ConditioningSetMask")
    assert mask["input_order"]["required"] == ["conditioning", "mask", "strength", "set_cond_area"]
    assert registry.object_info("ConditioningSetTimestepRange")["category"] == "advanced/conditioning"


# ---------------------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(folder, "sd1")
    write_checkpoint(folder, "sdxl")
    return folder


@pytest.fixture
def settings(tmp_path, checkpoints) -> Settings:
    return settings_with_checkpoints(tmp_path, checkpoints)


def regional_prompt(family: str = "sd1", seed: int = 1) -> dict:
    text = lambda s: {"class_type": "CLIPTextEncode", "inputs": {"text": s, "clip": ["1", 1]}}  # noqa: E731
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"tiny_{family}.safetensors"}},
        "2": text("a landscape"), "3": text("a red house"), "4": text("a blue sky"), "5": text("blurry"),
        "6": {"class_type": "ConditioningSetArea", "inputs": {
            "conditioning": ["3", 0], "width": 64, "height": 64, "x": 0, "y": 64, "strength": 1.2}},
        "8": {"class_type": "ConditioningSetAreaPercentage", "inputs": {
            "conditioning": ["4", 0], "width": 1.0, "height": 0.4, "x": 0.0, "y": 0.0, "strength": 1.0}},
        "9": {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["8", 0], "start": 0.0,
                                                                       "end": 0.5}},
        "10": {"class_type": "ConditioningAverage", "inputs": {"conditioning_to": ["2", 0],
                                                               "conditioning_from": ["4", 0],
                                                               "conditioning_to_strength": 0.8}},
        "11": {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": ["10", 0],
                                                              "conditioning_from": ["5", 0]}},
        "12": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["11", 0],
                                                               "conditioning_2": ["6", 0]}},
        "13": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["12", 0],
                                                               "conditioning_2": ["9", 0]}},
        "14": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "15": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 3, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["13", 0], "negative": ["5", 0], "latent_image": ["14", 0]}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["1", 2]}},
        "17": {"class_type": "SaveImage", "inputs": {"images": ["16", 0], "filename_prefix": "regions"}},
    }


def with_mask(prompt: dict) -> dict:
    prompt = dict(prompt)
    prompt["7"] = {"class_type": "ConditioningSetMask", "inputs": {
        "conditioning": ["3", 0], "mask": ["18", 1], "strength": 0.8, "set_cond_area": "mask bounds"}}
    prompt["18"] = {"class_type": "LoadImage", "inputs": {"image": "mask.png"}}
    prompt["19"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["13", 0],
                                                                    "conditioning_2": ["7", 0]}}
    prompt["15"] = {**prompt["15"], "inputs": {**prompt["15"]["inputs"], "positive": ["19", 0]}}
    return prompt


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_regional_prompt_end_to_end(client, settings, family):
    alpha = np.zeros((128, 128), dtype=np.uint8)
    alpha[:, :64] = 255  # LoadImage's mask is 1 - alpha: the right half
    rgba = np.dstack([np.full((128, 128, 3), 128, dtype=np.uint8), alpha])
    settings.input_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(settings.input_dir / "mask.png")
    response = client.post("/api/v1/prompts", json=with_mask(regional_prompt(family)),
                           headers={"Accept": "image/png"})
    assert response.status_code == 200, response.text
    pixels = np.asarray(Image.open(io.BytesIO(response.content)))
    assert pixels.shape == (128, 128, 3) and pixels.std() > 0
    plain = regional_prompt(family)
    plain["15"]["inputs"]["positive"] = ["2", 0]
    for node in ("6", "8", "9", "10", "11", "12", "13"):
        del plain[node]
    baseline = np.asarray(Image.open(io.BytesIO(client.post("/api/v1/prompts", json=plain,
                                                            headers={"Accept": "image/png"}).content)))
    assert not np.array_equal(pixels, baseline)
