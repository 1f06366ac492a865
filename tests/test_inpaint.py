"""img2img and inpainting: denoise < 1, the noise mask in the sampler (engine/sampling/ksampler.py), the inpainting
concat (engine/inpaint.py) and the nodes (nodes/inpaint.py), against direct computations, then end to end
through the HTTP app, including a 9-channel inpainting checkpoint."""
from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import nodes.inpaint as inpaint_nodes
from engine.inpaint import BLANK_INPAINT_LATENT, cond_options_to_fields, inpaint_concat, resize_to_batch
from engine.models.unet import UNetModel
from engine.registry import NodeRegistry
from engine.resize import common_upscale
from engine.sampling import ksampler
from engine.sampling.guidance import Cond
from engine.sampling.model_sampling import SD15_LATENT, ModelSampling
from engine.settings import Settings
from tests.conftest import settings_with_checkpoints
from tests.tiny_models import checkpoint_state_dict, randomize, sd1_unet, write_checkpoint

PNG = {"Accept": "image/png"}


def ctx(value: float) -> torch.Tensor:
    return torch.full((1, 77, 8), value)


class Shrink:
    """A toy denoiser predicting a shrunken x; records its inputs."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x, sigma, cross_attn, y, concat=None):
        self.inputs.append(x)
        return x * 0.3 + cross_attn.mean()


# ---------------------------------------------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------------------------------------------


def test_denoise_zero_returns_the_input_latent():
    latent = torch.randn(1, 4, 8, 8)
    out = ksampler.sample(Shrink(), ModelSampling(), SD15_LATENT, [Cond(ctx(1.0))], [], latent, seed=1, steps=10,
                          cfg=1.0, sampler_name="euler", scheduler="normal", denoise=0.0)
    assert out is latent


# (not uni_pc: as in ComfyUI it stops at sigma 0.001, not 0, so the kept region keeps a trace of noise)
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_sde", "ddim", "lms"])
def test_inpainting_leaves_unmasked_latent_pixels_unchanged(sampler):
    latent = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 24:56] = 1.0  # regenerate a box; pixel mask, resized to the latent by the sampler
    out = ksampler.sample(Shrink(), ModelSampling(), SD15_LATENT, [Cond(ctx(0.5))], [Cond(ctx(0.0))], latent,
                          seed=3, steps=6, cfg=4.0, sampler_name=sampler, scheduler="karras", noise_mask=mask)
    keep = F.interpolate(mask, size=(8, 8), mode="bilinear") == 0
    keep = keep.expand_as(out)
    err = (out[keep] - latent[keep]).abs().max().item()
    assert err < 1e-5, f"max abs error in the kept region {err:.2e}"
    assert (out[~keep] - latent[~keep]).abs().max() > 0.1  # the masked region was regenerated


def test_each_model_call_sees_the_kept_region_noised_to_its_sigma():
    latent = torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1.0
    sigmas = torch.tensor([5.0, 2.0, 0.0])
    noise = torch.randn(1, 4, 8, 8)
    for sampler, refill in [("euler", noise),
                            ("ddim", torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8)))]:
        model = Shrink()
        ksampler.sample_custom(model, ModelSampling(), SD15_LATENT, [Cond(ctx(0.0))], [], latent, sampler=sampler,
                               sigmas=sigmas, cfg=1.0, noise=noise, seed=7, noise_mask=mask)
        scaled = latent * 0.18215
        for x, sigma in zip(model.inputs, sigmas[:2]):
            err = (x[..., 4:] - (scaled[..., 4:] + refill[..., 4:] * sigma)).abs().max().item()
            assert err < 1e-6, f"{sampler}: max abs error {err:.2e}"
        assert torch.equal(model.inputs[0][..., :4], (noise * 5.0 + scaled)[..., :4])  # the sampler's own x


def test_prepare_mask_matches_comfyui_reshape_mask():
    mask = torch.rand(3, 40, 24)
    got = ksampler.prepare_mask(mask, (2, 4, 5, 3), "cpu")
    want = F.interpolate(mask.reshape(3, 1, 40, 24), size=(5, 3), mode="bilinear").repeat(1, 4, 1, 1)[:2]
    assert torch.equal(got, want)
    single = ksampler.prepare_mask(torch.rand(1, 1, 8, 8), (3, 4, 8, 8), "cpu")
    assert single.shape == (3, 4, 8, 8) and torch.equal(single[0], single[2])


# ---------------------------------------------------------------------------------------------------------------
# the inpainting concat
# ---------------------------------------------------------------------------------------------------------------


def test_inpaint_concat_defaults_to_a_blank_image_under_a_full_mask():
    latent = torch.randn(2, 4, 6, 5)
    fields = cond_options_to_fields({"concat_latent_image": torch.randn(1, 4, 6, 5)}, latent, ModelSampling(),
                                    latent_format=SD15_LATENT, inpaint_model=True)
    concat = fields["concat"]
    assert concat.shape == (2, 5, 6, 5) and torch.equal(concat[:, 0], torch.ones(2, 6, 5))
    for channel, value in enumerate(BLANK_INPAINT_LATENT):
        assert torch.equal(concat[:, 1 + channel], torch.full((2, 6, 5), value))
    assert "concat" not in cond_options_to_fields({}, latent, ModelSampling())  # a plain model takes none


def test_inpaint_concat_from_the_noise_mask_uses_the_sampled_latent():
    latent = torch.randn(1, 4, 8, 8)
    noise_mask = torch.rand(1, 1, 64, 64)
    concat = inpaint_concat({}, latent, SD15_LATENT, noise_mask, torch.device("cpu"))
    mask = F.interpolate(noise_mask, size=(8, 8), mode="bilinear").round()
    assert torch.equal(concat[:, :1], mask) and torch.equal(concat[:, 1:], latent * 0.18215)
    empty = inpaint_concat({}, torch.zeros(1, 4, 8, 8), SD15_LATENT, noise_mask, torch.device("cpu"))
    assert torch.equal(empty[:, 1:], torch.zeros(1, 4, 8, 8))  # an empty latent is not scaled


def test_inpaint_concat_from_inpaint_model_conditioning_options():
    latent = torch.zeros(3, 4, 8, 10)
    image = torch.randn(1, 4, 9, 9)
    mask = torch.rand(1, 1, 72, 72)
    concat = inpaint_concat({"concat_latent_image": image, "concat_mask": mask}, latent, SD15_LATENT,
                            torch.rand(1, 1, 64, 80), torch.device("cpu"))  # concat_mask wins over the noise mask
    want_image = common_upscale(image * 0.18215, 10, 8, "bilinear", "center").repeat(3, 1, 1, 1)
    want_mask = common_upscale(mask, 10, 8, "bilinear", "center").round().repeat(3, 1, 1, 1)
    assert torch.equal(concat, torch.cat([want_mask, want_image], dim=1))


def test_resize_to_batch_spreads_items():
    items = torch.arange(5.0).view(5, 1)
    assert resize_to_batch(items, 3).flatten().tolist() == [0.0, 2.0, 4.0]
    assert resize_to_batch(items[:2], 5).flatten().tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]  # floor((i + .5) * 2 / 5)
    assert resize_to_batch(items, 1).flatten().tolist() == [0.0]


# ---------------------------------------------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------------------------------------------


class FakeVae:
    """A VAE handle whose encoder records the pixels it is given."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def active(self):
        return contextlib.nullcontext(self)


@pytest.fixture
def recorded(monkeypatch):
    vae = FakeVae()

    def encode(autoencoder, pixels):
        autoencoder.seen.append(pixels.clone())
        return torch.zeros(pixels.shape[0], 4, pixels.shape[1] // 8, pixels.shape[2] // 8)

    monkeypatch.setattr(inpaint_nodes.autoencode, "encode", encode)
    return vae


def grown_reference(mask: np.ndarray, grow: int) -> np.ndarray:
    """Box dilation of a rounded 0/1 mask written out: a pixel is set when any pixel of the grow x grow window
    starting `ceil((grow - 1) / 2)` above and left of it is set."""
    pad = math.ceil((grow - 1) / 2)
    rounded = np.round(mask)
    out = np.zeros_like(mask)
    height, width = mask.shape
    for i in range(height):
        for j in range(width):
            window = rounded[max(0, i - pad):max(0, i - pad + grow), max(0, j - pad):max(0, j - pad + grow)]
            out[i, j] = 1.0 if window.size and window.max() > 0 else 0.0
    return out


@pytest.mark.parametrize("grow", [0, 1, 4, 6, 7])
def test_vae_encode_for_inpaint_grows_the_mask_and_greys_the_masked_pixels(recorded, grow):
    pixels = torch.rand(1, 37, 45, 4)  # not a multiple of 8, with alpha: cropped to 32 x 40, centred
    mask = torch.zeros(1, 37, 45)
    mask[:, 10:20, 15:30] = 0.9
    mask[:, 30, 40] = 0.4  # rounds to keep
    (latent,) = inpaint_nodes.VAEEncodeForInpaint().encode(recorded, pixels, mask, grow)
    cropped_pixels, cropped_mask = pixels[:, 2:34, 2:42], mask[0, 2:34, 2:42].numpy()
    seen = recorded.seen[0]
    assert seen.shape == (1, 32, 40, 4)
    masked = torch.tensor(np.round(cropped_mask) == 1)
    assert torch.equal(seen[0, masked][:, :3], torch.full((int(masked.sum()), 3), 0.5))
    assert torch.equal(seen[0, ~masked], cropped_pixels[0, ~masked])
    assert torch.equal(seen[..., 3], cropped_pixels[..., 3])  # alpha is left for the VAE to drop
    want = cropped_mask.round() if grow == 0 else grown_reference(cropped_mask, grow)
    assert latent["noise_mask"].shape == (1, 1, 32, 40)
    assert np.array_equal(latent["noise_mask"][0, 0].numpy(), want)


def test_a_mask_of_another_size_is_resized_bilinearly(recorded):
    mask = torch.zeros(1, 4, 4)
    mask[:, 1:3, 1:3] = 1.0
    (latent,) = inpaint_nodes.VAEEncodeForInpaint().encode(recorded, torch.rand(1, 32, 32, 3), mask, 0)
    want = F.interpolate(mask.view(1, 1, 4, 4), size=(32, 32), mode="bilinear").round()
    assert torch.equal(latent["noise_mask"], want)


def test_inpaint_model_conditioning_sets_concat_options_and_the_noise_mask(recorded):
    pixels = torch.rand(1, 36, 40, 3)
    mask = torch.zeros(1, 36, 40)
    mask[:, 8:24, 8:24] = 1.0
    positive = [[ctx(1.0), {"pooled_output": None}]]
    negative = [[ctx(0.0), {}]]
    pos, neg, latent = inpaint_nodes.InpaintModelConditioning().encode(positive, negative, pixels, recorded, mask)
    greyed, original = recorded.seen
    assert greyed.shape == (1, 32, 40, 3) and torch.equal(original, pixels)  # the original is encoded uncropped
    assert torch.equal(greyed[0, 10, 10], torch.full((3,), 0.5))
    for out in (pos, neg):
        assert out[0][1]["concat_mask"].shape == (1, 1, 32, 40)
        assert out[0][1]["concat_latent_image"].shape == (1, 4, 4, 5)
    assert torch.equal(latent["noise_mask"], pos[0][1]["concat_mask"])
    assert positive[0][1] == {"pooled_output": None}
    _, _, latent = inpaint_nodes.InpaintModelConditioning().encode(positive, negative, pixels, recorded, mask, False)
    assert "noise_mask" not in latent


def test_set_latent_noise_mask():
    latent = {"samples": torch.zeros(1, 4, 8, 8), "batch_index": [3]}
    (out,) = inpaint_nodes.SetLatentNoiseMask().set_mask(latent, torch.ones(2, 64, 64))
    assert out["noise_mask"].shape == (2, 1, 64, 64) and out["batch_index"] == [3] and "noise_mask" not in latent


def padded_reference(image, left, top, right, bottom, feathering):
    """ImagePadForOutpaint's per-pixel loop, written out."""
    b, h, w, c = image.shape
    out = np.full((b, h + top + bottom, w + left + right, c), 0.5, dtype=np.float32)
    out[:, top:top + h, left:left + w] = image.numpy()
    mask = np.ones((h + top + bottom, w + left + right), dtype=np.float32)
    inner = np.zeros((h, w), dtype=np.float32)
    if feathering > 0 and feathering * 2 < h and feathering * 2 < w:
        for i in range(h):
            for j in range(w):
                d = min(i if top else h, h - i if bottom else h, j if left else w, w - j if right else w)
                if d < feathering:
                    v = (feathering - d) / feathering
                    inner[i, j] = v * v
    mask[top:top + h, left:left + w] = inner
    return out, mask


@pytest.mark.parametrize("sides,feathering", [((8, 0, 16, 24), 5), ((0, 8, 0, 0), 3), ((8, 8, 8, 8), 0),
                                              ((8, 8, 8, 8), 12)])
def test_image_pad_for_outpaint_matches_the_loop(sides, feathering):
    image = torch.rand(2, 20, 24, 3)
    padded, mask = inpaint_nodes.ImagePadForOutpaint().expand_image(image, *sides, feathering)
    want_image, want_mask = padded_reference(image, *sides, feathering)
    assert np.array_equal(padded.numpy(), want_image)
    assert np.array_equal(mask.numpy(), want_mask)


def test_object_info_matches_comfyui():
    registry = NodeRegistry()
    registry.register_module("nodes.inpaint")
    info = registry.object_info("VAEEncodeForInpaint")
    assert info["input_order"]["required"] == ["pixels", "vae", "mask", "grow_mask_by"]
    assert info["input"]["required"]["grow_mask_by"][1] == {"default": 6, "min": 0, "max": 64, "step": 1}
    assert info["category"] == "latent/inpaint" and info["display_name"] == "VAE Encode (for Inpainting)"
    conditioning = registry.object_info("InpaintModelConditioning")
    assert conditioning["output_name"] == ["positive", "negative", "latent"]
    assert conditioning["input_order"]["required"] == ["positive", "negative", "vae", "pixels", "mask", "noise_mask"]
    pad = registry.object_info("ImagePadForOutpaint")
    assert pad["output"] == ["IMAGE", "MASK"] and pad["input"]["required"]["feathering"][1]["default"] == 40


# ---------------------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------------------


def write_inpaint_checkpoint(folder, name: str = "tiny_sd1_inpaint.safetensors"):
    """A tiny SD1 inpainting checkpoint: the 9-channel UNet with the SD1 text encoder and VAE."""
    generator = torch.Generator().manual_seed(5)
    unet = {f"model.diffusion_model.{k}": v for k, v in randomize(UNetModel(sd1_unet(in_channels=9)),
                                                                 generator).items()}
    rest = {k: v for k, v in checkpoint_state_dict("sd1").items() if not k.startswith("model.diffusion_model.")}
    save_file({k: v.contiguous() for k, v in {**unet, **rest}.items()}, str(folder / name))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(folder, "sd1")
    write_inpaint_checkpoint(folder)
    return folder


@pytest.fixture
def settings(tmp_path, checkpoints) -> Settings:
    return settings_with_checkpoints(tmp_path, checkpoints)


def add_masked_image(settings, name="masked.png", size=64):
    """An RGBA picture whose transparent right half is LoadImage's mask (mask = 1 - alpha)."""
    rgb = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    alpha = np.full((size, size), 255, dtype=np.uint8)
    alpha[:, size // 2:] = 0
    settings.input_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(settings.input_dir / name)


def base_prompt(ckpt="tiny_sd1.safetensors") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "masked.png"}},
    }


def sampler_node(latent, positive=("2", 0), negative=("3", 0), denoise=1.0, seed=4, sampler="euler"):
    return {"class_type": "KSampler", "inputs": {
        "seed": seed, "steps": 3, "cfg": 5.0, "sampler_name": sampler, "scheduler": "karras", "denoise": denoise,
        "model": ["1", 0], "positive": list(positive), "negative": list(negative), "latent_image": list(latent)}}


def run(client, prompt: dict) -> dict:
    """Run a prompt (its outputs are latent files: no image, so a 204) and return its history outputs."""
    response = client.post("/api/v1/prompts", json=prompt)
    assert response.status_code in (200, 204), response.text
    return list(client.get("/history").json().values())[-1]["outputs"]


def saved_latent(client, outputs: dict, node: str) -> torch.Tensor:
    entry = outputs[node]["latents"][0]
    folder = client.app.state.executor.folders.output / entry["subfolder"]
    return load_file(str(folder / entry["filename"]))["latent_tensor"]


def test_img2img_with_denoise_zero_returns_the_encoded_latent_end_to_end(client, settings):
    add_masked_image(settings)
    prompt = base_prompt()
    prompt.update({
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "6": sampler_node(("5", 0), denoise=0.0),
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/zero"}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/encoded"}},
    })
    outputs = run(client, prompt)
    assert torch.equal(saved_latent(client, outputs, "7"), saved_latent(client, outputs, "8"))


@pytest.mark.parametrize("sampler_class", ["KSampler", "SamplerCustom"])
def test_inpainting_end_to_end_keeps_the_unmasked_latent(client, settings, sampler_class):
    add_masked_image(settings)
    prompt = base_prompt()
    prompt.update({
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["4", 1]}},
        "7": sampler_node(("6", 0), denoise=0.8),
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "latents/out"}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/in"}},
    })
    if sampler_class == "SamplerCustom":
        prompt["10"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}}
        prompt["11"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras",
                                                                   "steps": 3, "denoise": 0.8}}
        prompt["7"] = {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 4, "cfg": 5.0, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": ["10", 0], "sigmas": ["11", 0], "latent_image": ["6", 0]}}
    outputs = run(client, prompt)
    out, original = saved_latent(client, outputs, "8"), saved_latent(client, outputs, "9")
    kept = (out[..., :4] - original[..., :4]).abs().max().item()  # mask 0 on the left half of the 8x8 latent
    assert kept < 1e-5, f"max abs change where the mask is 0: {kept:.2e}"
    assert (out[..., 4:] - original[..., 4:]).abs().max() > 0.01


@pytest.mark.parametrize("encoder", ["InpaintModelConditioning", "VAEEncodeForInpaint"])
def test_nine_channel_inpainting_checkpoint_end_to_end(client, settings, encoder):
    add_masked_image(settings)
    prompt = base_prompt("tiny_sd1_inpaint.safetensors")
    if encoder == "InpaintModelConditioning":
        prompt["5"] = {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2], "pixels": ["4", 0], "mask": ["4", 1],
            "noise_mask": True}}
        prompt["6"] = sampler_node(("5", 2), positive=("5", 0), negative=("5", 1))
    else:
        prompt["5"] = {"class_type": "VAEEncodeForInpaint", "inputs": {
            "pixels": ["4", 0], "vae": ["1", 2], "mask": ["4", 1], "grow_mask_by": 6}}
        prompt["6"] = sampler_node(("5", 0))
    prompt["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}
    prompt["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "inpainted"}}
    response = client.post("/api/v1/prompts", json=prompt, headers=PNG)
    assert response.status_code == 200, response.text  # a 4-channel input would not fit the 9-channel UNet
    assert np.asarray(Image.open(io.BytesIO(response.content))).shape == (64, 64, 3)


def test_outpainting_pad_then_inpaint_end_to_end(client, settings):
    add_masked_image(settings)
    prompt = base_prompt("tiny_sd1_inpaint.safetensors")
    prompt.update({
        "5": {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["4", 0], "left": 16, "top": 0,
                                                             "right": 8, "bottom": 8, "feathering": 10}},
        "6": {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["5", 0], "vae": ["1", 2],
                                                             "mask": ["5", 1], "grow_mask_by": 4}},
        "7": sampler_node(("6", 0)),
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "outpainted"}},
    })
    response = client.post("/api/v1/prompts", json=prompt, headers=PNG)
    assert response.status_code == 200, response.text
    assert np.asarray(Image.open(io.BytesIO(response.content))).shape == (72, 88, 3)
