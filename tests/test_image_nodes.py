"""Image nodes (nodes/image.py) against direct computations on small tensors: the resize methods against
`torch.nn.functional.interpolate` and Pillow as ComfyUI uses them (comfy/utils.py common_upscale / lanczos), the
filters against scipy's correlation over a mirrored border, quantisation against Pillow and the standard Bayer
matrix, compositing pixel by pixel; then the contract's cutout end to end as an RGBA PNG."""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import save_file

from engine.models.u2net import U2NetConfig
from engine.models.unet import UNetModel
from engine.resize import common_upscale
from engine.settings import Settings
from handler.body import prompt_digest
from nodes.image import (BLEND_MODES, DITHER_METHODS, ImageBlend, ImageBlur, ImageCompositeMasked,
                         ImageCrop, ImageCutout, ImageEstimateForegroundMask, ImageFromBatch, ImageQuantize,
                         ImageScale, ImageScaleBy, ImageScaleToTotalPixels, ImageSharpen, JoinImageWithAlpha,
                         RepeatImageBatch, SplitImageWithAlpha)
from tests.fake_hub import FakeHub
from tests.test_u2net import random_weights as random_u2net_weights
from tests.tiny_models import FAMILIES, write_checkpoint

PNG = {"Accept": "image/png"}


def rand(*shape, seed=0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def pillow_lanczos(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's lanczos for one IMAGE `[H, W, C]`: 8-bit pixels through Pillow, back as value / 255."""
    pixels = np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels  # one channel: a greyscale image
    resized = Image.fromarray(pixels).resize((width, height), resample=Image.Resampling.LANCZOS)
    out = torch.from_numpy(np.array(resized).astype(np.float32) / 255.0)
    return out if out.ndim == 3 else out[..., None]


# ---------------------------------------------------------------------------------------------------- resizing


def test_schemas_follow_comfyui():
    scale = ImageScale.INPUT_TYPES()["required"]
    assert scale["upscale_method"] == (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],)
    assert scale["width"][1] == {"default": 512, "min": 0, "max": 16384, "step": 1}
    assert scale["crop"] == (["disabled", "center"],)
    assert ImageScaleBy.INPUT_TYPES()["required"]["scale_by"][1] == {"default": 1.0, "min": 0.01, "max": 8.0,
                                                                     "step": 0.01}
    assert ImageSharpen.INPUT_TYPES()["required"]["alpha"][1] == {"default": 1.0, "min": 0.0, "max": 5.0,
                                                                  "step": 0.01}
    assert ImageQuantize.INPUT_TYPES()["required"]["dither"] == (DITHER_METHODS,)
    assert ImageCompositeMasked.INPUT_TYPES()["optional"] == {"mask": ("MASK",)}
    assert ImageCutout.INPUT_TYPES()["required"] == {"image": ("IMAGE",), "mask": ("MASK",)}
    assert (ImageScale.CATEGORY, ImageBlur.CATEGORY, ImageCrop.CATEGORY, ImageFromBatch.CATEGORY,
            JoinImageWithAlpha.CATEGORY, ImageCutout.CATEGORY, ImageEstimateForegroundMask.CATEGORY) == (
        "image/upscaling", "image/postprocessing", "image/transform", "image/batch", "mask/compositing",
        "image/postprocessing", "image/postprocessing")


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic"])
@pytest.mark.parametrize("scale", [0.125, 0.5, 1.37, 8])
def test_image_scale_by_is_interpolate(method, scale):
    image = rand(2, 16, 24, 3)
    (out,) = ImageScaleBy().upscale(image, method, scale)
    size = (round(16 * scale), round(24 * scale))
    expected = F.interpolate(image.permute(0, 3, 1, 2), size=size, mode=method).permute(0, 2, 3, 1)
    assert torch.equal(out, expected)


def test_nearest_exact_down_then_up_by_8_is_pixel_blocks():
    image = rand(1, 64, 64, 3)
    (small,) = ImageScaleBy().upscale(image, "nearest-exact", 0.125)
    assert torch.equal(small, image[:, 4::8, 4::8])  # the centre pixel (index 8k + 4) of each 8x8 block
    (big,) = ImageScaleBy().upscale(small, "nearest-exact", 8)
    assert torch.equal(big, small.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2))


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("size", [(7, 5), (40, 31), (12, 12)])
def test_lanczos_is_pillow_on_8_bit_pixels(channels, size):
    image = rand(2, 12, 12, channels)
    image[0, 0, 0] = 1.3  # clipped, as ComfyUI's 8-bit round trip does
    width, height = size
    (out,) = ImageScale().upscale(image, "lanczos", width, height, "disabled")
    for index in range(2):
        assert torch.equal(out[index], pillow_lanczos(image[index], width, height))


def test_lanczos_keeps_dtype_and_resizes_other_channel_counts_plane_by_plane():
    image = rand(1, 2, 9, 9, seed=5).double()
    out = common_upscale(image, 4, 6, "lanczos")
    assert out.dtype == torch.float64 and out.shape == (1, 2, 6, 4)
    for c in range(2):
        plane = pillow_lanczos(image[0, c, :, :, None], 4, 6)
        assert torch.equal(out[0, c], plane[..., 0].double())


def test_image_scale_sizes_and_crop():
    image = rand(1, 30, 40, 3)
    assert ImageScale().upscale(image, "bilinear", 0, 0, "disabled")[0] is image
    assert ImageScale().upscale(image, "area", 0, 15, "disabled")[0].shape == (1, 15, 20, 3)
    assert ImageScale().upscale(image, "area", 10, 0, "disabled")[0].shape == (1, 8, 10, 3)  # round(7.5) = 8
    (out,) = ImageScale().upscale(image, "nearest-exact", 30, 30, "center")  # 4:3 -> 1:1 drops 5 columns each side
    assert torch.equal(out, image[:, :, 5:35])


@pytest.mark.parametrize("megapixels, steps, expected", [(0.01, 1, (89, 118)), (0.01, 8, (88, 120)),
                                                         (1.0, 64, (896, 1152))])
def test_image_scale_to_total_pixels(megapixels, steps, expected):
    image = rand(1, 30, 40, 3)
    (out,) = ImageScaleToTotalPixels().upscale(image, "bilinear", megapixels, steps)
    scale = math.sqrt(megapixels * 1024 * 1024 / (30 * 40))
    assert out.shape[1:3] == (round(30 * scale / steps) * steps, round(40 * scale / steps) * steps) == expected


def test_image_crop_keeps_the_corner_inside():
    image = rand(2, 10, 12, 3)
    assert torch.equal(ImageCrop().crop(image, 5, 4, x=3, y=2)[0], image[:, 2:6, 3:8])
    assert torch.equal(ImageCrop().crop(image, 5, 4, x=50, y=50)[0], image[:, 9:, 11:])


def test_repeat_and_from_batch():
    image = rand(3, 4, 5, 3)
    assert torch.equal(RepeatImageBatch().repeat(image, 2)[0], torch.cat([image, image]))
    assert torch.equal(ImageFromBatch().frombatch(image, 1, 5)[0], image[1:])
    assert torch.equal(ImageFromBatch().frombatch(image, 7, 1)[0], image[2:])


# ---------------------------------------------------------------------------------------------------- blending


def soft_light(a: float, b: float) -> float:
    """The W3C compositing spec's soft-light."""
    if b <= 0.5:
        return a - (1 - 2 * b) * a * (1 - a)
    d = ((16 * a - 12) * a + 4) * a if a <= 0.25 else math.sqrt(a)
    return a + (2 * b - 1) * (d - a)


MODES = {"normal": lambda a, b: b, "multiply": lambda a, b: a * b, "screen": lambda a, b: 1 - (1 - a) * (1 - b),
         "overlay": lambda a, b: 2 * a * b if a <= 0.5 else 1 - 2 * (1 - a) * (1 - b), "soft_light": soft_light,
         "difference": lambda a, b: a - b}


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_image_blend_per_pixel(mode):
    a, b = rand(1, 3, 4, 3, seed=1), rand(1, 3, 4, 3, seed=2)
    (out,) = ImageBlend().blend_images(a, b, 0.3, mode)
    expected = torch.tensor([min(max(x * 0.7 + MODES[mode](x, y) * 0.3, 0.0), 1.0)
                             for x, y in zip(a.flatten().tolist(), b.flatten().tolist())]).reshape(a.shape)
    assert torch.allclose(out, expected, atol=1e-6), (out - expected).abs().max()  # observed ~6e-8


def test_image_blend_resizes_the_second_image_and_keeps_the_first_alpha():
    a, b = rand(1, 8, 8, 4, seed=1), rand(1, 4, 6, 3, seed=2)
    (out,) = ImageBlend().blend_images(a, b, 1.0, "normal")
    resized = common_upscale(F.pad(b, (0, 1), value=1.0).permute(0, 3, 1, 2), 8, 8, "bicubic", "center")
    assert torch.equal(out[..., :3], resized.permute(0, 2, 3, 1)[..., :3].clamp(0, 1))
    assert torch.equal(out[..., 3], a[..., 3])


def gaussian(size: int, sigma: float) -> np.ndarray:
    coords = np.linspace(-1, 1, size)
    g = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def correlate(image: torch.Tensor, kernel: np.ndarray) -> np.ndarray:
    """Per-channel correlation over a mirrored border (torch's 'reflect' is scipy's 'mirror')."""
    values = image.double().numpy()
    out = np.empty_like(values)
    for n, c in itertools.product(range(values.shape[0]), range(values.shape[-1])):
        out[n, ..., c] = scipy.ndimage.correlate(values[n, ..., c], kernel, mode="mirror")
    return out


@pytest.mark.parametrize("radius, sigma", [(1, 1.0), (2, 0.5), (4, 3.0)])
def test_image_blur_is_a_gaussian_over_a_mirrored_border(radius, sigma):
    image = rand(2, 11, 13, 3)
    (out,) = ImageBlur().blur(image, radius, sigma)
    expected = correlate(image, gaussian(2 * radius + 1, sigma))
    assert out.shape == image.shape and np.abs(out.numpy() - expected).max() < 1e-6  # observed 2.4e-7


@pytest.mark.parametrize("radius, sigma, alpha", [(1, 1.0, 1.0), (2, 0.7, 0.3), (3, 2.0, 0.0)])
def test_image_sharpen_is_unsharp_masking(radius, sigma, alpha):
    image = rand(1, 9, 10, 4)
    (out,) = ImageSharpen().sharpen(image, radius, sigma, alpha)
    kernel = -10 * alpha * gaussian(2 * radius + 1, sigma)
    kernel[radius, radius] += 1 - kernel.sum()
    expected = np.clip(correlate(image, kernel), 0, 1)
    assert np.abs(out.numpy() - expected).max() < 2e-6  # observed 3.6e-7 (float32 against float64)


def test_quantize_matches_pillow():
    image = rand(2, 16, 16, 3, seed=3)
    for dither, pillow_dither in [("none", Image.Dither.NONE), ("floyd-steinberg", Image.Dither.FLOYDSTEINBERG)]:
        (out,) = ImageQuantize().quantize(image, 5, dither)
        for index in range(2):
            pil = Image.fromarray((image[index] * 255).to(torch.uint8).numpy(), "RGB")
            expected = pil.quantize(palette=pil.quantize(colors=5), dither=pillow_dither).convert("RGB")
            assert np.array_equal((out[index] * 255).round().to(torch.uint8).numpy(), np.array(expected))


def bayer_indices(order: int) -> np.ndarray:
    """The standard Bayer index matrix: [[4M, 4M+2], [4M+3, 4M+1]] from M of half the size."""
    m = np.zeros((1, 1))
    while m.shape[0] < order:
        m = np.block([[4 * m, 4 * m + 2], [4 * m + 3, 4 * m + 1]])
    return m


@pytest.mark.parametrize("order", [2, 4, 8, 16])
def test_quantize_bayer_adds_the_normalised_bayer_matrix(order):
    image = rand(1, 21, 19, 4, seed=6)
    (out,) = ImageQuantize().quantize(image, 6, f"bayer-{order}")
    pil = Image.fromarray((image[0, ..., :3] * 255).to(torch.uint8).numpy(), "RGB")
    palette = pil.quantize(colors=6)
    spread = np.float32(2 * 256 / (len(palette.getpalette()) // 3))
    threshold = ((bayer_indices(order) + 0.5) / order ** 2 - 0.5).astype(np.float32)  # centred on zero
    tiles = (math.ceil(21 / order), math.ceil(19 / order))
    offsets = spread * np.tile(threshold, tiles)[:21, :19, None] + np.float32(0.5)
    dithered = np.clip(np.array(pil).astype(np.float32) + offsets, 0, 255).astype(np.uint8)
    expected = Image.fromarray(dithered).quantize(palette=palette, dither=Image.Dither.NONE).convert("RGB")
    assert np.array_equal((out[0, ..., :3] * 255).round().to(torch.uint8).numpy(), np.array(expected))
    assert torch.equal(out[..., 3], image[..., 3])  # alpha passes through


# ---------------------------------------------------------------------------------------------------- compositing


def composite_reference(destination, source, x, y, mask):
    """Pixel by pixel: inside the destination, mask * source + (1 - mask) * destination."""
    out = destination.clone()
    for n, sy, sx in itertools.product(range(source.shape[0]), range(source.shape[1]), range(source.shape[2])):
        ty, tx = y + sy, x + sx
        if ty < out.shape[1] and tx < out.shape[2]:
            m = mask[n, sy, sx] if mask is not None else 1.0
            out[n, ty, tx] = m * source[n, sy, sx] + (1 - m) * destination[n, ty, tx]
    return out


@pytest.mark.parametrize("x, y", [(0, 0), (2, 3), (6, 5), (40, 40)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_image_composite_masked(x, y, with_mask):
    destination, source = rand(2, 7, 8, 3, seed=1), rand(2, 4, 5, 3, seed=2)
    mask = rand(2, 4, 5, seed=3) if with_mask else None
    (out,) = ImageCompositeMasked().composite(destination, source, x, y, False, mask)
    assert torch.allclose(out, composite_reference(destination, source, x, y, mask), atol=1e-6)
    assert torch.equal(destination, rand(2, 7, 8, 3, seed=1))  # the input is not changed


def test_image_composite_masked_resizes_source_and_mask_and_cycles_batches():
    destination, source = rand(2, 6, 6, 4, seed=1), rand(1, 3, 3, 3, seed=2)
    mask = rand(1, 2, 2, seed=3)
    (out,) = ImageCompositeMasked().composite(destination, source, 0, 0, True, mask)
    big = F.interpolate(F.pad(source, (0, 1), value=1.0).permute(0, 3, 1, 2), size=(6, 6), mode="bilinear")
    big_mask = F.interpolate(mask[:, None], size=(6, 6), mode="bilinear")[:, 0]
    expected = composite_reference(destination, big.permute(0, 2, 3, 1).expand(2, -1, -1, -1), 0, 0,
                                   big_mask.expand(2, -1, -1))
    assert torch.allclose(out, expected, atol=1e-6)


def test_join_and_split_image_with_alpha():
    image, mask = rand(2, 5, 6, 3), rand(2, 5, 6, seed=1)
    (joined,) = JoinImageWithAlpha().join_image_with_alpha(image, mask)
    assert torch.equal(joined[..., :3], image) and torch.allclose(joined[..., 3], 1 - mask)
    rgb, alpha = SplitImageWithAlpha().split_image_with_alpha(joined)
    assert torch.equal(rgb, image) and torch.allclose(alpha, mask, atol=1e-7)
    rgb, alpha = SplitImageWithAlpha().split_image_with_alpha(image)
    assert torch.equal(alpha, torch.zeros(2, 5, 6))  # no alpha: opaque, an empty mask


def test_join_image_with_alpha_resizes_and_cycles():
    image, mask = rand(3, 8, 8, 4), rand(1, 4, 4, seed=1)
    (joined,) = JoinImageWithAlpha().join_image_with_alpha(image, mask)
    resized = F.interpolate(mask[:, None], size=(8, 8), mode="bilinear")[:, 0]
    assert joined.shape == (3, 8, 8, 4)
    assert all(torch.equal(joined[i, ..., 3], 1.0 - resized[0]) for i in range(3))


# ---------------------------------------------------------------------------------------------------- cutout


def test_cutout_puts_the_mask_in_alpha_as_float64():
    image, mask = rand(2, 5, 6, 3), rand(2, 5, 6, seed=1)
    (out,) = ImageCutout().cutout(image, mask)
    assert out.shape == (2, 5, 6, 4) and out.dtype == torch.float64
    assert torch.equal(out[..., :3], image.double()) and torch.equal(out[..., 3], mask.double())


def test_cutout_of_other_sizes_and_batches():
    image = rand(3, 8, 8, 4)  # RGBA: its own alpha is replaced
    (out,) = ImageCutout().cutout(image, rand(8, 8, seed=1))  # one [H, W] mask for the whole batch
    assert out.shape == (3, 8, 8, 4) and all(torch.equal(out[i, ..., 3], rand(8, 8, seed=1).double())
                                             for i in range(3))
    small = rand(1, 4, 4, seed=2)
    (out,) = ImageCutout().cutout(image[:1], small)
    expected = F.interpolate(small[:, None], size=(8, 8), mode="bilinear")[:, 0]
    assert torch.equal(out[..., 3], expected.double())
    (out,) = ImageCutout().cutout(image[:1], rand(2, 8, 8, seed=3))  # more masks than images: the image repeats
    assert out.shape == (2, 8, 8, 4) and torch.equal(out[1, ..., :3], image[0, ..., :3].double())


def cutout_prompt(alpha: float) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 6, "batch_size": 1, "color": 0x336699}},
        "2": {"class_type": "SolidMask", "inputs": {"value": alpha, "width": 8, "height": 6}},
        "3": {"class_type": "BinarizeMask", "inputs": {"mask": ["2", 0], "threshold": 128}},
        "4": {"class_type": "ImageCutout", "inputs": {"image": ["1", 0], "mask": ["3", 0]}},
        "5": {"class_type": "ImageScaleBy", "inputs": {"image": ["4", 0], "upscale_method": "nearest-exact",
                                                       "scale_by": 2}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "cut"}},
    }


@pytest.mark.parametrize("alpha, opaque", [(0.75, 255), (0.25, 0)])
def test_cutout_saves_an_rgba_png_and_view_splits_its_channels(client, alpha, opaque):
    response = client.post("/api/v1/prompts", json=cutout_prompt(alpha), headers=PNG)
    assert response.status_code == 200, response.text
    saved = Image.open(io.BytesIO(response.content))
    assert saved.mode == "RGBA" and saved.size == (16, 12)
    assert np.array_equal(np.asarray(saved).reshape(-1, 4), np.tile([0x33, 0x66, 0x99, opaque], (16 * 12, 1)))
    view = client.post("/api/v1/prompts", json=cutout_prompt(alpha)).json()["urls"][1]
    alpha_only = Image.open(io.BytesIO(client.get(view + "&channel=a").content))
    assert np.all(np.asarray(alpha_only.getchannel("A")) == opaque)
    rgb = Image.open(io.BytesIO(client.get(view + "&channel=rgb").content))
    assert rgb.mode == "RGB" and np.all(np.asarray(rgb) == [0x33, 0x66, 0x99])


# ---------------------------------------------------------------------------------------------------- the example


def contract_example() -> dict:
    """components.schemas.Prompt.example of the API contract, verbatim."""
    with open(Path(__file__).resolve().parents[2] / "shared" / "openapi.yaml") as f:
        return yaml.safe_load(f)["components"]["schemas"]["Prompt"]["example"]


def tiny_sdxl_lora(rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya-layout LoRA on every attention projection of the tiny SDXL UNet (tests/tiny_models.py)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in UNetModel(FAMILIES["sdxl"][0], device="meta").named_modules():
        if isinstance(module, torch.nn.Linear) and (".attn1." in name or ".attn2." in name):
            stem = "lora_unet_" + name.replace(".", "_")
            weights[f"{stem}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.1
            weights[f"{stem}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.1
            weights[f"{stem}.alpha"] = torch.tensor(float(rank))
    return weights


def half(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}


@pytest.fixture
def example_hub(tmp_path, monkeypatch):
    """The fake hub serving tiny random files under the example's model names, as a user registry names them:
    the tiny SDXL checkpoint, a LoRA for it, and U^2-Net in its real (fixed) layout, in float16 to halve it."""
    src = tmp_path / "src"
    src.mkdir()
    save_file(tiny_sdxl_lora(), str(src / "lora.safetensors"))
    torch.save(half(random_u2net_weights(U2NetConfig.u2net())), src / "u2net.pth")
    files = [  # (folder, name in the prompt, hub repo, path in the repo, bytes)
        ("checkpoints", "sd_xl_base_1.0.safetensors", "test-org/sdxl", "tiny_sdxl.safetensors",
         write_checkpoint(src, "sdxl").read_bytes()),
        ("loras", "pixel-art-xl-v1.1.safetensors", "test-org/pixel-art", "pixel-art-xl.safetensors",
         (src / "lora.safetensors").read_bytes()),
        ("background_removal", "u2net", "test-org/rembg", "u2net.pth", (src / "u2net.pth").read_bytes()),
    ]
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"models": [
        {"name": name, "folder": folder, "repo": repo, "path": path, "revision": "main",
         "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
        for folder, name, repo, path, blob in files]}))
    with FakeHub() as hub:
        for _folder, _name, repo, path, blob in files:
            hub.publish(repo, path, blob)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield registry


def test_the_contracts_example_prompt_runs_end_to_end(make_client, tmp_path, example_hub):
    """SDXL + LoRA -> VAEDecode -> ImageScaleBy 0.125 -> ImageEstimateForegroundMask -> BinarizeMask -> ImageCutout
    -> ImageScaleBy 8 -> SaveImage, verbatim, with every model fetched from the (fake) hub by its registry name."""
    client = make_client(Settings(data_dir=tmp_path / "data", model_registry=example_hub))
    if not len(getattr(client.app.state.executor.models, "registry", ())):
        pytest.skip("the executor does not build ModelFiles.from_settings(settings) yet")
    prompt = contract_example()
    r = client.post("/api/v1/prompts", json=prompt)
    assert r.status_code == 200, r.text
    digest = prompt_digest(prompt)
    assert r.headers["Location"] == f"/api/v1/images/{digest}"
    assert r.headers["Digest"] == f"SHA256={digest}"
    assert r.headers["Content-Disposition"] == "filename=Downscale_00001_.png"
    digest_url, view_url = r.json()["urls"]
    assert digest_url == r.headers["Location"]
    assert view_url == "http://testserver/view?filename=Downscale_00001_.png&type=output"
    image = Image.open(io.BytesIO(client.get(digest_url).content))
    assert image.mode == "RGBA" and image.size == (512, 512)  # 512 / 8 * 8
    alpha = np.asarray(image.getchannel("A"))
    assert set(np.unique(alpha)) <= {0, 255}  # binarized: opaque foreground, transparent background
    blocks = np.asarray(image).reshape(64, 8, 64, 8, 4)
    assert (blocks == blocks[:, :1, :, :1]).all()  # pixel art: 8x8 blocks of one colour
    again = client.post("/api/v1/prompts", json=prompt, headers=PNG)
    assert again.status_code == 200 and again.headers["content-type"] == "image/png"
    assert again.content == client.get(digest_url).content
    assert again.headers["Location"] == r.headers["Location"]
