"""Mask nodes (nodes/mask.py) against direct computations on small tensors, following ComfyUI's
comfy_extras/nodes_mask.py and the contract's BinarizeMask (mask >= threshold / 255)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nodes.mask import (BinarizeMask, CropMask, FeatherMask, GrowMask, ImageToMask, InvertMask, MaskComposite,
                        MaskToImage, SolidMask, ThresholdMask)


def rand(*shape, seed=0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_schemas_follow_comfyui():
    assert ImageToMask.INPUT_TYPES()["required"]["channel"] == (["red", "green", "blue", "alpha"],)
    assert SolidMask.INPUT_TYPES()["required"]["value"][1] == {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}
    assert ThresholdMask.INPUT_TYPES()["required"]["value"][1]["default"] == 0.5
    assert BinarizeMask.INPUT_TYPES()["required"]["threshold"] == (
        "INT", {"default": 250, "min": 0, "max": 255, "step": 1})
    grow = GrowMask.INPUT_TYPES()["required"]
    assert grow["expand"][1]["min"] == -16384 and grow["tapered_corners"] == ("BOOLEAN", {"default": True})
    assert MaskComposite.INPUT_TYPES()["required"]["operation"] == (
        ["multiply", "add", "subtract", "and", "or", "xor"],)
    assert {cls.CATEGORY for cls in (ImageToMask, MaskToImage, InvertMask, SolidMask, ThresholdMask, BinarizeMask,
                                     GrowMask, FeatherMask, CropMask, MaskComposite)} == {"mask"}


@pytest.mark.parametrize("channel, index", [("red", 0), ("green", 1), ("blue", 2), ("alpha", 3)])
def test_image_to_mask_takes_one_channel_of_every_image(channel, index):
    image = rand(2, 3, 4, 4)
    (mask,) = ImageToMask().image_to_mask(image, channel)
    assert mask.shape == (2, 3, 4) and torch.equal(mask, image[..., index])


def test_mask_to_image_repeats_the_mask_in_three_channels():
    mask = rand(2, 3, 4)
    (image,) = MaskToImage().mask_to_image(mask)
    assert image.shape == (2, 3, 4, 3)
    for c in range(3):
        assert torch.equal(image[..., c], mask)
    (single,) = MaskToImage().mask_to_image(mask[0])  # an [H, W] mask is a batch of one
    assert single.shape == (1, 3, 4, 3)


def test_invert_and_solid():
    mask = rand(2, 3, 4)
    assert torch.equal(InvertMask().invert(mask)[0], 1.0 - mask)
    (solid,) = SolidMask().solid(0.25, width=5, height=3)
    assert solid.shape == (1, 3, 5) and solid.dtype == torch.float32 and bool((solid == 0.25).all())


def test_threshold_mask_is_strictly_greater():
    mask = torch.tensor([[[0.2, 0.5, 0.50001, 0.9]]])
    assert ThresholdMask().image_to_mask(mask, 0.5)[0].tolist() == [[[0.0, 0.0, 1.0, 1.0]]]


def test_binarize_mask_at_the_8_bit_levels():
    levels = torch.arange(256, dtype=torch.float32) / 255.0  # what an 8-bit mask holds, as float32
    mask = levels.reshape(1, 16, 16)
    for threshold in (0, 1, 128, 250, 255):
        (out,) = BinarizeMask().binarize(mask, threshold)
        expected = (torch.arange(256) >= threshold).float().reshape(1, 16, 16)
        assert torch.equal(out, expected), threshold
        assert out.dtype == torch.float32


def test_binarize_mask_between_levels():
    mask = torch.tensor([[0.98, 0.9803, 0.99]])  # 250 / 255 = 0.98039...
    assert BinarizeMask().binarize(mask, 250)[0].tolist() == [[0.0, 0.0, 1.0]]


def dilate(mask: np.ndarray, steps: int, tapered: bool) -> np.ndarray:
    """Max (or min, for negative steps) over the pixel and its neighbours inside the image: 4 neighbours with
    tapered corners, 8 without; pixels outside the image do not take part."""
    offsets = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]
    if not tapered:
        offsets += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    pick, fill = (np.maximum, -np.inf) if steps > 0 else (np.minimum, np.inf)
    out = mask.astype(np.float64)
    for _ in range(abs(steps)):
        padded = np.pad(out, 1, constant_values=fill)
        result = np.full_like(out, fill)
        for dy, dx in offsets:
            result = pick(result, padded[1 + dy:1 + dy + out.shape[0], 1 + dx:1 + dx + out.shape[1]])
        out = result
    return out


@pytest.mark.parametrize("expand, tapered", [(0, True), (1, True), (2, False), (3, True), (-1, True), (-2, False)])
def test_grow_mask_is_grey_dilation_or_erosion(expand, tapered):
    mask = (rand(2, 9, 11, seed=1) > 0.8).float() * rand(2, 9, 11, seed=2)
    (out,) = GrowMask().expand_mask(mask, expand, tapered)
    assert out.shape == (2, 9, 11) and out.dtype == torch.float32
    for index in range(2):
        assert np.array_equal(out[index].numpy(), dilate(mask[index].numpy(), expand, tapered).astype(np.float32))


def test_grow_mask_of_one_pixel_draws_a_diamond():
    mask = torch.zeros(1, 7, 7)
    mask[0, 3, 3] = 1
    (out,) = GrowMask().expand_mask(mask, 2, True)
    distance = torch.tensor([[abs(y - 3) + abs(x - 3) for x in range(7)] for y in range(7)])
    assert torch.equal(out[0], (distance <= 2).float())


@pytest.mark.parametrize("left, top, right, bottom", [(0, 0, 0, 0), (3, 0, 0, 0), (0, 2, 0, 4), (2, 3, 4, 1),
                                                       (6, 0, 5, 0), (20, 20, 0, 0)])
def test_feather_mask_multiplies_linear_ramps(left, top, right, bottom):
    mask = rand(2, 5, 8)
    (out,) = FeatherMask().feather(mask, left, top, right, bottom)
    height, width = 5, 8
    l, r, t, b = min(left, width), min(right, width), min(top, height), min(bottom, height)
    expected = mask.clone()
    for y, x in itertools.product(range(height), range(width)):
        factor = 1.0
        if x < l:
            factor *= (x + 1) / l
        if width - 1 - x < r:
            factor *= (width - x) / r
        if y < t:
            factor *= (y + 1) / t
        if height - 1 - y < b:
            factor *= (height - y) / b
        expected[:, y, x] *= factor
    assert torch.allclose(out, expected, atol=1e-6), (out - expected).abs().max()  # observed < 1e-7
    assert torch.equal(mask, rand(2, 5, 8))  # the input is not changed


def test_crop_mask():
    mask = rand(2, 6, 8)
    (out,) = CropMask().crop(mask, x=2, y=1, width=3, height=10)
    assert torch.equal(out, mask[:, 1:6, 2:5])
    assert CropMask().crop(mask[0], 0, 0, 2, 2)[0].shape == (1, 2, 2)


@pytest.mark.parametrize("operation", ["multiply", "add", "subtract", "and", "or", "xor"])
@pytest.mark.parametrize("x, y", [(0, 0), (3, 2), (6, 4)])
def test_mask_composite_pixel_by_pixel(operation, x, y):
    destination, source = rand(2, 5, 8, seed=3), rand(2, 3, 4, seed=4)
    (out,) = MaskComposite().combine(destination, source, x, y, operation)
    expected = destination.clone()
    ops = {"multiply": lambda a, b: a * b, "add": lambda a, b: a + b, "subtract": lambda a, b: a - b,
           "and": lambda a, b: float(round(a) and round(b)), "or": lambda a, b: float(round(a) or round(b)),
           "xor": lambda a, b: float(bool(round(a)) != bool(round(b)))}
    for n, sy, sx in itertools.product(range(2), range(3), range(4)):
        if y + sy < 5 and x + sx < 8:
            before = destination[n, y + sy, x + sx].item()
            expected[n, y + sy, x + sx] = ops[operation](before, source[n, sy, sx].item())
    assert torch.allclose(out, expected.clamp(0, 1), atol=1e-7)


def test_mask_composite_outside_the_destination_only_clamps():
    destination = torch.tensor([[[1.5, -0.5]]])
    (out,) = MaskComposite().combine(destination, torch.ones(1, 1, 1), 5, 0, "add")
    assert out.tolist() == [[[1.0, 0.0]]]
