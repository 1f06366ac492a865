"""Latent nodes and ComfyUI's common_upscale, against direct computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.resize import bislerp, common_upscale
from nodes.latent import EmptyLatentImage, LatentFromBatch, LatentUpscale, LatentUpscaleBy, RepeatLatentBatch


def latent(batch=2, h=8, w=12, seed=0):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))


def test_empty_latent_shape():
    (out,) = EmptyLatentImage().generate(width=520, height=300, batch_size=3)
    assert out["samples"].shape == (3, 4, 37, 65)
    assert out["samples"].abs().sum() == 0


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic"])
def test_common_upscale_is_interpolate(method):
    x = latent()
    assert torch.equal(common_upscale(x, 20, 10, method), F.interpolate(x, size=(10, 20), mode=method))


def test_center_crop_keeps_the_middle():
    x = torch.arange(1 * 1 * 4 * 8, dtype=torch.float32).reshape(1, 1, 4, 8)
    out = common_upscale(x, 4, 4, "nearest-exact", "center")  # 2:1 -> 1:1 drops two columns each side
    assert torch.equal(out, x[..., 2:6])


def test_bislerp_same_size_is_identity_and_keeps_norms_between_neighbours():
    x = latent()
    assert torch.allclose(bislerp(x, 12, 8), x, atol=1e-5)
    up = bislerp(x, 24, 16)
    assert up.shape == (2, 4, 16, 24)
    norms, up_norms = x.norm(dim=1), up.norm(dim=1)
    assert up_norms.max() <= norms.max() + 1e-4  # slerp interpolates norms linearly: never above the inputs
    assert up_norms.min() >= norms.min() - 1e-4


def test_bislerp_between_two_pixels_is_a_slerp():
    a, b = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0, 0.0])
    x = torch.stack([a, b], dim=-1).reshape(1, 4, 1, 2)
    out = bislerp(x, 4, 1)[0, :, 0, :]  # new columns at source coords -0.25, 0.25, 0.75, 1.25 (clamped)
    coords = F.interpolate(torch.arange(2.0).reshape(1, 1, 1, 2), size=(1, 4), mode="bilinear").reshape(-1)
    for column, position in enumerate(coords.tolist()):
        r = position - math.floor(position)
        first = a if math.floor(position) == 0 else b
        second = b if math.floor(position) == 0 else b
        if torch.equal(first, second):
            expected = first
        else:
            angle = math.pi / 2
            unit = (math.sin((1 - r) * angle) * first / first.norm() + math.sin(r * angle) * second / second.norm())
            expected = unit / math.sin(angle) * (first.norm() * (1 - r) + second.norm() * r)
        assert torch.allclose(out[:, column], expected, atol=1e-5), column


def test_latent_upscale_sizes():
    samples = {"samples": latent(h=8, w=12)}
    (out,) = LatentUpscale().upscale(samples, "nearest-exact", 0, 128, "disabled")
    assert out["samples"].shape[-2:] == (16, 24)  # width follows the height's scale
    (out,) = LatentUpscale().upscale(samples, "bilinear", 8, 8, "disabled")
    assert out["samples"].shape[-2:] == (8, 8)  # at least 64 pixels a side
    (same,) = LatentUpscale().upscale(samples, "bilinear", 0, 0, "disabled")
    assert same["samples"] is samples["samples"]
    (by,) = LatentUpscaleBy().upscale(samples, "bicubic", 1.5)
    assert by["samples"].shape[-2:] == (12, 18)


def test_latent_from_batch_and_repeat():
    samples = {"samples": latent(batch=4), "noise_mask": torch.rand(2, 1, 8, 12)}
    (one,) = LatentFromBatch().frombatch(samples, batch_index=2, length=5)
    assert torch.equal(one["samples"], samples["samples"][2:4])
    assert one["batch_index"] == [2, 3]
    assert torch.equal(one["noise_mask"], samples["noise_mask"].repeat(2, 1, 1, 1)[2:4])
    (rep,) = RepeatLatentBatch().repeat(one, amount=3)
    assert rep["samples"].shape[0] == 6
    assert rep["batch_index"] == [2, 3, 4, 5, 6, 7]
    assert torch.equal(rep["samples"][2:4], one["samples"])
