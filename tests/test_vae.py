"""The SD VAE, its weight loading, ComfyUI's tiling and the pixel conversions around it.

Oracles: diffusers' AutoencoderKL loaded through diffusers' own ldm converter (`convert_ldm_vae_checkpoint`), and, for
tiling, a literal re-statement of ComfyUI's `tiled_scale_multidim` loop written here independently of
engine/tiling.py. Tiny configurations with random weights; every comparison states the error it observed.
"""
from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from engine import autoencode
from engine.models.vae import (AutoencoderKL, VAEConfig, VAEWeightsError, convert_vae_state_dict, detect_vae_config,
                               load_vae)
from engine.tiling import tiled_scale

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

TINY = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)        # downscale 2
TINY3 = VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2)    # downscale 4


def random_ldm_weights(config: VAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the original layout, scaled so activations stay O(1) through the network."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in AutoencoderKL(config, device="meta").state_dict().items():
        if ".norm" in key and key.endswith(".weight"):
            t = 1.0 + 0.1 * torch.randn(ref.shape, generator=g)
        elif key.endswith(".bias"):
            t = 0.1 * torch.randn(ref.shape, generator=g)
        else:
            fan_in = math.prod(ref.shape[1:])
            t = torch.randn(ref.shape, generator=g) / math.sqrt(fan_in)
        out[key] = t
    return out


def diffusers_config(config: VAEConfig) -> dict:
    levels = len(config.ch_mult)
    return dict(in_channels=config.in_channels, out_channels=config.out_channels,
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=tuple(config.ch * m for m in config.ch_mult),
                layers_per_block=config.num_res_blocks, latent_channels=config.embed_dim, norm_num_groups=32)


def diffusers_from_ldm(config: VAEConfig, ldm: dict[str, torch.Tensor]):
    cfg = diffusers_config(config)
    model = diffusers.AutoencoderKL(**cfg).eval()
    converted = convert_ldm_vae_checkpoint(dict(ldm), cfg)
    missing, unexpected = model.load_state_dict(converted, strict=True)
    assert not missing and not unexpected
    return model


@functools.lru_cache(maxsize=None)
def ours(config: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """A shared tiny VAE with random weights; tests must not modify it."""
    return load_vae(random_ldm_weights(config, seed))


# ---------------------------------------------------------------------------------------------------------------
# The network against diffusers


@pytest.mark.parametrize("config", [TINY, TINY3], ids=["f2", "f4"])
def test_matches_diffusers_on_ldm_weights(config):
    ldm = random_ldm_weights(config)
    vae = load_vae(ldm)
    ref = diffusers_from_ldm(config, ldm)
    f = config.downscale_factor
    x = torch.rand(2, 3, 8 * f, 6 * f, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
        z_ref = ref.encode(x).latent_dist.mean
        y = vae.decode(z)
        y_ref = ref.decode(z).sample
    assert z.shape == (2, 4, 8, 6)
    assert y.shape == x.shape
    err_z = (z - z_ref).abs().max().item()
    err_y = (y - y_ref).abs().max().item()
    # observed: encode 2.2e-6, decode 6.0e-6 (float32, outputs up to ~3 in magnitude)
    assert err_z < 1e-4, f"encode max abs err {err_z}"
    assert err_y < 1e-4, f"decode max abs err {err_y}"
    assert y.abs().max() > 0.1  # not a degenerate all-zero network


def test_encode_returns_the_mean_deterministically():
    vae = ours(TINY)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(x))
        assert torch.equal(vae.encode(x), moments[:, :4])
        assert torch.equal(vae.encode(x), vae.encode(x))


def test_downsample_pads_bottom_right_only():
    vae = ours(TINY)
    down = vae.encoder.down[0].downsample
    x = torch.randn(1, 32, 6, 6)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert torch.equal(down(x), expected)


def test_full_size_builds_on_meta_with_the_sd_key_set():
    vae = AutoencoderKL(VAEConfig.sd(), device="meta")
    sd = vae.state_dict()
    assert len(sd) == 248 and sum(t.numel() for t in sd.values()) == 83_653_863  # the SD/SDXL VAE
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["decoder.up.3.block.2.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd["decoder.up.1.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)
    assert vae.downscale_factor == 8


# ---------------------------------------------------------------------------------------------------------------
# Weight conversion


def perturbed_diffusers(config: VAEConfig, seed: int = 3):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**diffusers_config(config)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # diffusers initialises norms to 1/0: randomise everything
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("legacy_attention_names", [False, True])
def test_diffusers_layout_converts(legacy_attention_names):
    ref = perturbed_diffusers(TINY3)
    sd = ref.state_dict()
    if legacy_attention_names:
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        def rename(k: str) -> str:
            return next((k.replace(f".{a}.", f".{b}.") for a, b in old.items() if f".{a}." in k), k)

        sd = {rename(k): v for k, v in sd.items()}
        assert any(".proj_attn." in k for k in sd)
    vae = load_vae(sd)
    assert vae.config == TINY3
    x = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        err_z = (vae.encode(x) - ref.encode(x).latent_dist.mean).abs().max().item()
        z = torch.randn(1, 4, 4, 5, generator=torch.Generator().manual_seed(5))
        err_y = (vae.decode(z) - ref.decode(z).sample).abs().max().item()
    # observed: encode 2.2e-6, decode 4.8e-6
    assert err_z < 1e-4 and err_y < 1e-4, (err_z, err_y)


def test_full_size_diffusers_layout_maps_every_key():
    cfg = diffusers_config(VAEConfig.sd())
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**cfg)
    converted = convert_vae_state_dict(ref.state_dict())
    assert detect_vae_config(converted) == VAEConfig.sd()
    assert set(converted) == set(AutoencoderKL(VAEConfig.sd(), device="meta").state_dict())
    assert converted["decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)


def test_prefix_and_extra_keys():
    ldm = random_ldm_weights(TINY)
    checkpoint = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
    checkpoint["first_stage_model.loss.logvar"] = torch.zeros(())
    converted = convert_vae_state_dict(checkpoint, "first_stage_model.")
    assert set(converted) == set(ldm)
    assert all(converted[k] is ldm[k] for k in ldm)


def test_linear_attention_weights_in_original_layout_are_reshaped():
    ldm = random_ldm_weights(TINY)
    key = "decoder.mid.attn_1.v.weight"
    ldm_linear = dict(ldm, **{key: ldm[key][:, :, 0, 0]})
    assert torch.equal(convert_vae_state_dict(ldm_linear)[key], ldm[key])


def test_missing_and_misshapen_weights_name_the_key():
    ldm = random_ldm_weights(TINY)
    missing = {k: v for k, v in ldm.items() if k != "decoder.up.1.block.0.conv2.bias"}
    with pytest.raises(VAEWeightsError) as info:
        convert_vae_state_dict(missing)
    assert info.value.key == "decoder.up.1.block.0.conv2.bias"
    bad = dict(ldm, **{"encoder.mid.attn_1.k.bias": torch.zeros(7)})
    with pytest.raises(VAEWeightsError, match="encoder.mid.attn_1.k.bias"):
        convert_vae_state_dict(bad)
    with pytest.raises(VAEWeightsError):
        convert_vae_state_dict({"model.diffusion_model.out.0.weight": torch.zeros(3)})


# ---------------------------------------------------------------------------------------------------------------
# tiled_scale against a literal re-statement of ComfyUI's loop


def reference_tiled_scale(samples, function, tile_x, tile_y, overlap, upscale_amount, out_channels):
    """ComfyUI's tiled_scale_multidim for two dims, step by step, with its narrow().mul_() mask construction."""
    tile = (tile_y, tile_x)
    output = torch.empty([samples.shape[0], out_channels] + [round(s * upscale_amount) for s in samples.shape[2:]])
    for b in range(samples.shape[0]):
        s = samples[b:b + 1]
        if all(s.shape[d + 2] <= tile[d] for d in range(2)):
            output[b:b + 1] = function(s)
            continue
        out = output[b:b + 1].zero_()
        out_div = torch.zeros([1, 1] + list(out.shape[2:]))
        positions = [range(0, s.shape[d + 2] - overlap, tile[d] - overlap) if s.shape[d + 2] > tile[d] else [0]
                     for d in range(2)]
        for it in itertools.product(*positions):
            s_in, up = s, []
            for d in range(2):
                pos = max(0, min(s.shape[d + 2] - overlap, it[d]))
                length = min(tile[d], s.shape[d + 2] - pos)
                s_in = s_in.narrow(d + 2, pos, length)
                up.append(round(pos * upscale_amount))
            ps = function(s_in)
            mask = torch.ones([1, 1] + list(ps.shape[2:]))
            for d in range(2, 4):
                feather = round(overlap * upscale_amount)
                if feather >= mask.shape[d]:
                    continue
                for t in range(feather):
                    a = (t + 1) / feather
                    mask.narrow(d, t, 1).mul_(a)
                    mask.narrow(d, mask.shape[d] - 1 - t, 1).mul_(a)
            o, o_d, p, m = out, out_div, ps, mask
            for d in range(2):
                length = min(p.shape[d + 2], o.shape[d + 2] - up[d])
                o, o_d = o.narrow(d + 2, up[d], length), o_d.narrow(d + 2, up[d], length)
                p, m = p.narrow(d + 2, 0, length), m.narrow(d + 2, 0, length)
            o.add_(p * m)
            o_d.add_(m)
        out.div_(out_div)
    return output


def nearest_up(factor):
    return lambda t: F.interpolate(t, scale_factor=factor, mode="nearest")


def tile_dependent(t):
    """Upscales x4 and adds a per-tile constant, so overlapping tiles disagree and blending shows."""
    return F.interpolate(t, scale_factor=4, mode="nearest") + 0.1 * t.shape[-1] + t.mean() * 3


@pytest.mark.parametrize("size,tile,overlap", [((37, 50), (16, 12), 4), ((20, 70), (8, 32), 6), ((9, 9), (4, 4), 3)])
def test_tiled_scale_matches_comfyui_bitwise(size, tile, overlap):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(7))
    tile_y, tile_x = tile
    ours_ = tiled_scale(x, tile_dependent, tile_x, tile_y, overlap, 4, 3, "cpu")
    ref = reference_tiled_scale(x, tile_dependent, tile_x, tile_y, overlap, 4, 3)
    assert torch.equal(ours_, ref), (ours_ - ref).abs().max()


def test_tiled_scale_of_a_local_function_equals_untiled():
    x = torch.rand(1, 3, 41, 29, generator=torch.Generator().manual_seed(8))
    tiled = tiled_scale(x, nearest_up(4), 12, 10, 4, 4, 3, "cpu")
    direct = nearest_up(4)(x)
    err = (tiled - direct).abs().max().item()
    assert err < 1e-6, f"max abs err {err}"  # observed: 1.8e-7 (the blend is a weighted mean of equal values)


def test_tiled_scale_blend_is_convex():
    """Each tile returns its own index: every output lies between the indices of the tiles covering it."""
    calls = []

    def tile_index(t):
        calls.append(t.shape)
        return torch.full((1, 1, t.shape[2] * 2, t.shape[3] * 2), float(len(calls) - 1))

    x = torch.zeros(1, 1, 30, 30)
    out = tiled_scale(x, tile_index, 12, 12, 4, 2, 1, "cpu")
    n = len(calls)
    assert n == 16  # starts 0, 8, 16, 24 on each axis
    assert out.min() >= 0 and out.max() <= n - 1
    assert out[0, 0, 0, 0] == 0 and out[0, 0, -1, -1] == n - 1  # corners belong to one tile
    seam = out[0, 0, 0, 16:24]  # where tiles 0 and 1 overlap, the weights ramp from one to the other
    assert (seam.diff() >= 0).all() and 0 < seam[0] < seam[-1] < 1


def test_tiled_scale_single_tile_is_the_function_unmasked():
    x = torch.rand(2, 3, 10, 12)
    assert torch.equal(tiled_scale(x, tile_dependent, 12, 10, 4, 4, 3, "cpu"), torch.cat([tile_dependent(x[:1]),
                                                                                        tile_dependent(x[1:])]))


def test_tiled_scale_downscale_rounds_positions_like_comfyui():
    x = torch.rand(1, 2, 40, 56, generator=torch.Generator().manual_seed(9))
    pool = lambda t: F.avg_pool2d(t, 8) + t.mean()  # noqa: E731
    ours_ = tiled_scale(x, pool, 24, 16, 4, 1 / 8, 2, "cpu")
    ref = reference_tiled_scale(x, pool, 24, 16, 4, 1 / 8, 2)
    assert torch.equal(ours_, ref)


def test_tiled_scale_rejects_an_overlap_that_never_advances():
    with pytest.raises(ValueError):
        tiled_scale(torch.zeros(1, 1, 20, 20), nearest_up(1), 8, 8, 8, 1, 1, "cpu")


# ---------------------------------------------------------------------------------------------------------------
# Pixel conversions and the node-level procedures


def reference_decode_tiled(vae, latent, tile_x, tile_y, overlap):
    """ComfyUI's VAE.decode_tiled_ over the reference tiled_scale, then process_output and movedim."""
    fn = lambda a: vae.decode(a.to(vae.dtype)).float()  # noqa: E731
    f = vae.downscale_factor
    with torch.no_grad():
        x = (reference_tiled_scale(latent, fn, tile_x // 2, tile_y * 2, overlap, f, 3)
             + reference_tiled_scale(latent, fn, tile_x * 2, tile_y // 2, overlap, f, 3)
             + reference_tiled_scale(latent, fn, tile_x, tile_y, overlap, f, 3)) / 3.0
    return x.add_(1.0).div_(2.0).clamp_(0.0, 1.0).movedim(1, -1)


def test_to_image_and_to_vae_input():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    image = autoencode.to_image(x)
    assert image.shape == (1, 1, 6, 3)
    assert image[0, 0, :, 0].tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    pixels = torch.tensor([0.0, 0.25, 1.0]).view(1, 1, 3, 1).expand(1, 1, 3, 3)
    assert autoencode.to_vae_input(pixels)[0, :, 0, :].tolist() == [[-1.0, -0.5, 1.0]] * 3


def test_decode_returns_clamped_float32_channels_last_on_cpu():
    vae = ours(TINY)
    z = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(10)) * 3
    image = autoencode.decode(vae, z)
    assert image.shape == (2, 12, 10, 3) and image.dtype == torch.float32 and image.device.type == "cpu"
    with torch.no_grad():
        expected = ((vae.decode(z) + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert torch.equal(image, expected)
    assert image.min() == 0.0 and image.max() == 1.0  # the scaled latent drives some pixels past both ends


def test_decode_in_bfloat16_casts_inputs_and_returns_float32():
    vae = load_vae(random_ldm_weights(TINY), dtype=torch.bfloat16)
    z = torch.randn(1, 4, 4, 4)
    image = autoencode.decode(vae, z)
    assert image.dtype == torch.float32
    with torch.no_grad():
        expected = autoencode.to_image(vae.decode(z.to(torch.bfloat16)).float())
    assert torch.equal(image, expected)


def test_crop_for_encode_is_comfyui_centre_crop():
    image = torch.rand(2, 37, 43, 4)
    cropped = autoencode.crop_for_encode(image, 8)
    # 37 -> 32 from row (37 % 8) // 2 = 2; 43 -> 40 from column (43 % 8) // 2 = 1; alpha dropped
    assert torch.equal(cropped, image[:, 2:34, 1:41, :3])
    assert autoencode.crop_for_encode(image[:, :32, :40], 8).shape == (2, 32, 40, 3)
    with pytest.raises(ValueError):
        autoencode.crop_for_encode(torch.rand(1, 16, 16, 1), 8)


def test_encode_crops_drops_alpha_and_maps_to_minus_one_one():
    vae = ours(TINY3)  # downscale 4
    image = torch.rand(2, 37, 43, 4, generator=torch.Generator().manual_seed(11))
    latent = autoencode.encode(vae, image)
    assert latent.shape == (2, 4, 9, 10) and latent.dtype == torch.float32
    with torch.no_grad():
        expected = vae.encode(image[:, 0:36, 1:41, :3].movedim(-1, 1) * 2 - 1)  # offsets (37%4)//2, (43%4)//2
    assert torch.equal(latent, expected)


def test_decode_tiled_matches_comfyui_procedure():
    vae = ours(TINY)
    z = torch.randn(1, 4, 18, 13, generator=torch.Generator().manual_seed(12))
    ticks = []
    # VAEDecodeTiled(tile_size=32 px, overlap=8 px) on a downscale-2 VAE -> 16 latent samples, overlap 4
    image = autoencode.decode_tiled(vae, z, tile_size=32, overlap=8, progress=lambda v, t: ticks.append((v, t)))
    expected = reference_decode_tiled(vae, z, 16, 16, 4)
    err = (image - expected).abs().max().item()
    assert err == 0.0, f"max abs err {err}"
    # grids 8x32: 3 tiles, 32x8: 4 tiles, 16x16: 2 tiles
    assert [v for v, _ in ticks] == list(range(1, 10)) and {t for _, t in ticks} == {9}


def test_decode_tiled_shrinks_overlap_to_a_quarter_tile():
    vae = ours(TINY)
    z = torch.randn(1, 4, 10, 9, generator=torch.Generator().manual_seed(13))
    image = autoencode.decode_tiled(vae, z, tile_size=24, overlap=8)  # 24 < 4 * 8: overlap -> 6 px -> 3 latent
    assert torch.equal(image, reference_decode_tiled(vae, z, 12, 12, 3))


def test_decode_tiled_of_one_tile_is_plain_decode():
    vae = ours(TINY)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(14))
    tiled = autoencode.decode_tiled(vae, z, tile_size=64, overlap=0)  # every grid holds the whole latent
    err = (tiled - autoencode.decode(vae, z)).abs().max().item()
    # observed: 6e-8, from (a + a + a) / 3 (a batch of 2 would add ~3e-6: tiles decode one image at a time)
    assert err < 1e-6, f"max abs err {err}"


def test_decode_tiled_is_close_to_plain_decode_in_the_interior():
    """Loose by nature: GroupNorm statistics and the mid-block attention see a tile, not the whole latent."""
    vae = ours(TINY)
    z = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(15))
    plain = autoencode.decode(vae, z)
    tiled = autoencode.decode_tiled(vae, z, tile_size=48, overlap=16)
    interior = (tiled - plain)[:, 8:-8, 8:-8].abs()
    err, mean = interior.max().item(), interior.mean().item()
    # observed: max 0.23, mean 0.024 on images spanning 0..1; a misplaced tile gives a mean error near 0.3
    assert mean < 0.05 and err < 0.5, f"interior max abs err {err}, mean {mean}"
    assert err > 0  # tiling did happen


def test_encode_tiled_matches_comfyui_procedure():
    vae = ours(TINY)
    image = torch.rand(1, 50, 42, 3, generator=torch.Generator().manual_seed(16))
    latent = autoencode.encode_tiled(vae, image, tile_size=16, overlap=4)
    fn = lambda a: vae.encode(a * 2.0 - 1.0).float()  # noqa: E731
    x = image.movedim(-1, 1)
    with torch.no_grad():
        expected = reference_tiled_scale(x, fn, 16, 16, 4, 1 / 2, 4)
        expected += reference_tiled_scale(x, fn, 32, 8, 4, 1 / 2, 4)
        expected += reference_tiled_scale(x, fn, 8, 32, 4, 1 / 2, 4)
        expected /= 3.0
    assert latent.shape == (1, 4, 25, 21)
    assert torch.equal(latent, expected)


class FlakyVAE(AutoencoderKL):
    """Runs out of memory once on an input wider than a limit, as a too-large decode/encode on a GPU would."""

    failures = 1
    decode_limit = encode_limit = 1 << 30

    def decode(self, z):
        if self.failures and z.shape[-1] > self.decode_limit:
            self.failures -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().decode(z)

    def encode(self, x):
        if self.failures and x.shape[-1] > self.encode_limit:
            self.failures -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().encode(x)


def flaky(config: VAEConfig, **limits) -> FlakyVAE:
    vae = FlakyVAE(config, device="meta")
    vae.load_state_dict(random_ldm_weights(config), assign=True)
    vae.__dict__.update(limits)
    return vae.eval()


def test_fallback_tiles_are_comfyuis():
    assert (autoencode.FALLBACK_DECODE_TILE, autoencode.FALLBACK_DECODE_OVERLAP) == (64, 16)
    assert (autoencode.FALLBACK_ENCODE_TILE, autoencode.FALLBACK_ENCODE_OVERLAP) == (512, 64)


@pytest.fixture
def small_fallback_tiles(monkeypatch):
    """ComfyUI's fallback tiles scaled down, so the tiny VAE's fallback runs several tiles quickly."""
    monkeypatch.setattr(autoencode, "FALLBACK_DECODE_TILE", 8)
    monkeypatch.setattr(autoencode, "FALLBACK_DECODE_OVERLAP", 2)
    monkeypatch.setattr(autoencode, "FALLBACK_ENCODE_TILE", 16)
    monkeypatch.setattr(autoencode, "FALLBACK_ENCODE_OVERLAP", 4)


def test_decode_falls_back_to_tiled_on_out_of_memory(caplog, small_fallback_tiles):
    vae = flaky(TINY, decode_limit=8)
    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(17))
    ticks = []
    image = autoencode.decode(vae, z, progress=lambda v, t: ticks.append(v))
    assert vae.failures == 0 and "retrying tiled" in caplog.text
    assert torch.equal(image, reference_decode_tiled(vae, z, 8, 8, 2))
    # grids 4x16: 4 tiles, 16x4: 5 tiles, 8x8: 4 tiles
    assert ticks == list(range(1, 14))


def test_encode_falls_back_to_tiled_on_out_of_memory(caplog, small_fallback_tiles):
    vae = flaky(TINY, encode_limit=16)
    image = torch.rand(1, 20, 26, 3, generator=torch.Generator().manual_seed(18))
    latent = autoencode.encode(vae, image)
    assert vae.failures == 0 and "retrying tiled" in caplog.text
    assert torch.equal(latent, autoencode.encode_tiled(vae, image, tile_size=16, overlap=4))


def test_interrupt_stops_tiled_decode():
    vae = ours(TINY)
    z = torch.randn(1, 4, 20, 20)
    seen = []

    class Stop(Exception):
        pass

    def check():
        seen.append(1)
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        autoencode.decode_tiled(vae, z, tile_size=16, overlap=4, check_interrupted=check)
    assert len(seen) == 2
