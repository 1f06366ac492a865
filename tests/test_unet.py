"""The LDM UNet against diffusers' UNet2DConditionModel, loaded from the same original-layout state dict.

Each tiny configuration mirrors one family's shape (SD1.x, SD2.x, SDXL base, SDXL refiner, SD1.x inpainting). A
random state dict in the original checkpoint layout is loaded into our model as is, and converted for diffusers by
diffusers' own `convert_ldm_unet_checkpoint`; both models then run the same inputs in float32. Observed maximum
absolute error on CPU: 0.0 for every family and size (the same float32 operations in the same order; outputs reach
about 2.7). The tests allow 2e-6, tight enough to catch, e.g., a SpatialTransformer GroupNorm eps of 1e-5 instead of
1e-6 (which shows as 4.5e-6 to 1e-5).
"""
from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from engine.models.unet import (CHECKPOINT_PREFIX, UNetCheckpointError, UNetConfig, UNetModel, detect_unet_config,
                                load_unet, timestep_embedding, unet_keys)

TOLERANCE = 2e-6

SD1_LIKE = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(2, 2, 2),
                      transformer_depth=(1, 1, 1, 1, 0, 0), transformer_depth_output=(1, 1, 1, 1, 1, 1, 0, 0, 0),
                      transformer_depth_middle=1, num_heads=2, context_dim=32)
SD2_LIKE = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1),
                      transformer_depth=(1, 1, 0), transformer_depth_output=(1, 1, 1, 1, 0, 0),
                      transformer_depth_middle=1, num_heads=None, num_head_channels=16, context_dim=48,
                      use_linear_in_transformer=True)
# SDXL: pooled text (24 here, 1280 real) + six size/crop ids embedded 8 wide each (256 real) = adm_in_channels.
SDXL_LIKE = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(2, 2, 2),
                       transformer_depth=(0, 0, 1, 1, 2, 2), transformer_depth_output=(0, 0, 0, 1, 1, 1, 2, 2, 2),
                       transformer_depth_middle=2, num_heads=None, num_head_channels=16, context_dim=64,
                       use_linear_in_transformer=True, adm_in_channels=24 + 6 * 8)
# Refiner: attention only in the two middle levels, pooled text (16) + five ids (size, crop, aesthetic score).
REFINER_LIKE = UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=(1, 1, 1, 1),
                          transformer_depth=(0, 2, 2, 0), transformer_depth_output=(0, 0, 2, 2, 2, 2, 0, 0),
                          transformer_depth_middle=2, num_heads=None, num_head_channels=16, context_dim=40,
                          use_linear_in_transformer=True, adm_in_channels=16 + 5 * 8)
INPAINT_LIKE = dataclasses.replace(SD1_LIKE, in_channels=9)

FAMILIES = {"sd1": SD1_LIKE, "sd2": SD2_LIKE, "sdxl": SDXL_LIKE, "refiner": REFINER_LIKE, "inpaint": INPAINT_LIKE}
ADD_TIME_DIM = 8  # diffusers' addition_time_embed_dim for the tiny SDXL-like models


def random_checkpoint(config: UNetConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the original layout (`model.diffusion_model.*`) with O(1)-preserving random values."""
    generator = torch.Generator().manual_seed(seed)
    shapes = UNetModel(config, device="meta").state_dict()
    checkpoint = {}
    for key, meta in shapes.items():
        noise = torch.randn(meta.shape, generator=generator)
        if meta.ndim >= 2:
            value = noise / math.sqrt(meta[0].numel())
        elif key.endswith(".weight"):  # GroupNorm / LayerNorm scale
            value = 1 + 0.1 * noise
        else:
            value = 0.1 * noise
        checkpoint[CHECKPOINT_PREFIX + key] = value
    return checkpoint


def diffusers_config(config: UNetConfig) -> dict:
    """The UNet2DConditionModel config of the same network (uniform num_res_blocks only, as diffusers needs)."""
    per_block = config.num_res_blocks[0]
    depth = [config.transformer_depth[level * per_block] for level in range(len(config.channel_mult))]
    # diffusers takes the middle depth from the last level's entry; a level without attention ignores its entry.
    layers = [d or 1 for d in depth[:-1]] + [config.transformer_depth_middle]
    if config.num_heads is not None:
        heads = config.num_heads
    else:
        heads = [config.model_channels * m // config.num_head_channels for m in config.channel_mult]
    extra = {}
    if config.adm_in_channels is not None:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=ADD_TIME_DIM,
                     projection_class_embeddings_input_dim=config.adm_in_channels)
    return dict(
        sample_size=16, in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)],
        block_out_channels=[config.model_channels * m for m in config.channel_mult], layers_per_block=per_block,
        cross_attention_dim=config.context_dim, attention_head_dim=heads,
        use_linear_projection=config.use_linear_in_transformer, transformer_layers_per_block=layers, **extra)


def diffusers_unet(config: UNetConfig, checkpoint: dict[str, torch.Tensor]) -> UNet2DConditionModel:
    settings = diffusers_config(config)
    model = UNet2DConditionModel(**settings)
    model.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, settings), strict=True)
    return model.eval()


def ours(config: UNetConfig, checkpoint: dict[str, torch.Tensor], dtype=torch.float32) -> UNetModel:
    model = UNetModel(config, device="meta", dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in unet_keys(checkpoint).items()}, assign=True, strict=True)
    return model.eval()


def inputs(config: UNetConfig, height: int = 16, width: int = 16, seed: int = 1):
    """x, timesteps, context, y for our model, and the matching extra arguments for diffusers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, height, width, generator=g)
    timesteps = torch.tensor([999.0, 17.5])
    context = torch.randn(2, 7, config.context_dim, generator=g)
    if config.adm_in_channels is None:
        return (x, timesteps, context, None), {}
    ids = 6 if config is SDXL_LIKE else 5
    pooled = torch.randn(2, config.adm_in_channels - ids * ADD_TIME_DIM, generator=g)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 768.0, 2.5, 6.0][:ids],
                             [512.0, 512.0, 8.0, 0.0, 640.0, 512.0, 6.0, 2.5][:ids]])
    # SDXL's y: pooled text, then each id's sinusoidal embedding (what ComfyUI's SDXL encode_adm builds).
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), ADD_TIME_DIM).reshape(2, -1)], dim=1)
    return (x, timesteps, context, y), {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_matches_diffusers(family):
    config = FAMILIES[family]
    checkpoint = random_checkpoint(config)
    (x, t, context, y), extra = inputs(config)
    got = ours(config, checkpoint)(x, t, context, y)
    want = diffusers_unet(config, checkpoint)(x, t, encoder_hidden_states=context, **extra).sample
    assert got.shape == (2, config.out_channels, 16, 16)
    err = (got - want).abs().max().item()
    assert err < TOLERANCE, f"{family}: max abs error {err:.2e} against diffusers (output scale {want.abs().max():.2f})"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@torch.no_grad()
def test_odd_latent_size_matches_diffusers(family):
    # 13x11 goes 13x11 -> 7x6 -> 4x3 down; each Upsample must land on the skip's size, not on twice its input.
    config = FAMILIES[family]
    checkpoint = random_checkpoint(config, seed=2)
    (x, t, context, y), extra = inputs(config, 13, 11)
    got = ours(config, checkpoint)(x, t, context, y)
    want = diffusers_unet(config, checkpoint)(x, t, encoder_hidden_states=context, **extra).sample
    assert got.shape == (2, 4, 13, 11)
    err = (got - want).abs().max().item()
    assert err < TOLERANCE, f"{family} 13x11: max abs error {err:.2e} against diffusers"


@torch.no_grad()
def test_parameter_dtype_decides_computation():
    config = SDXL_LIKE
    checkpoint = random_checkpoint(config, seed=3)
    (x, t, context, y), _ = inputs(config)
    reference = ours(config, checkpoint)(x, t, context, y)
    model = load_unet(checkpoint, config=config, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    got = model(x, t, context, y)  # float32 inputs are cast to the parameters' dtype
    assert got.dtype == torch.bfloat16
    err = (got.float() - reference).abs().max().item()
    assert err < 0.1, f"bfloat16 against float32: max abs error {err:.3f}"


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 3.5, 999.0])
    emb = timestep_embedding(t, 7)
    half = 3
    freqs = torch.tensor([10000 ** (-i / half) for i in range(half)], dtype=torch.float64)
    args = t.double()[:, None] * freqs
    want = torch.cat([args.cos(), args.sin(), torch.zeros(3, 1, dtype=torch.float64)], dim=1)
    assert emb.dtype == torch.float32
    assert (emb.double() - want).abs().max().item() < 1e-3  # float32 arguments up to 999 rad


@pytest.mark.parametrize("family", list(FAMILIES))
def test_detect_recovers_tiny_configs(family):
    config = FAMILIES[family]
    detected = detect_unet_config(random_checkpoint(config))
    # Head counts are not in the weights: conv projections get 8 heads, linear ones 64-channel heads (ComfyUI).
    heads = dict(num_heads=None, num_head_channels=64) if config.use_linear_in_transformer else dict(num_heads=8)
    assert detected == dataclasses.replace(config, **heads)


@pytest.mark.parametrize("preset", ["sd15", "sd15_inpaint", "sd21", "sdxl_base", "sdxl_refiner"])
def test_detect_recovers_presets(preset):
    config = getattr(UNetConfig, preset)()
    shapes = {CHECKPOINT_PREFIX + k: v for k, v in UNetModel(config, device="meta").state_dict().items()}
    shapes["first_stage_model.decoder.conv_in.weight"] = torch.empty(512, 4, 3, 3, device="meta")
    assert detect_unet_config(shapes) == config


def test_detect_lone_middle_resblock():
    config = dataclasses.replace(SD2_LIKE, transformer_depth_middle=None)
    assert detect_unet_config(random_checkpoint(config)) == dataclasses.replace(config, num_head_channels=64)


# Parameter counts of the released UNets (diffusers' UNet2DConditionModel of each has the same count).
PARAMETERS = {"sd15": 859_520_964, "sd15_inpaint": 859_535_364, "sd21": 865_910_724,
              "sdxl_base": 2_567_463_684, "sdxl_refiner": 2_259_526_660}


@pytest.mark.parametrize("preset", list(PARAMETERS))
def test_preset_parameter_counts(preset):
    config = getattr(UNetConfig, preset)()
    ours_count = sum(p.numel() for p in UNetModel(config, device="meta").parameters())
    assert ours_count == PARAMETERS[preset]
    settings = diffusers_config(config)
    if config.adm_in_channels is not None:
        settings["addition_time_embed_dim"] = 256
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**settings)
    assert sum(p.numel() for p in theirs.parameters()) == PARAMETERS[preset]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read resident memory")
def test_meta_construction_allocates_nothing():
    before = _resident_bytes()
    model = UNetModel(UNetConfig.sdxl_base(), device="meta", dtype=torch.float16)
    grown = _resident_bytes() - before
    assert all(p.is_meta for p in model.parameters())
    with torch.device("meta"):  # the default device decides when none is passed
        assert all(p.is_meta for p in UNetModel(UNetConfig.sdxl_refiner()).parameters())
    grown = _resident_bytes() - before
    assert grown < 256 * 2**20, f"resident memory grew {grown / 2**20:.0f} MiB building a 5 GiB model on meta"


def test_real_device_construction_is_uninitialised_storage():
    model = UNetModel(SD2_LIKE, device="cpu", dtype=torch.float16)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_not_a_unet_raises_typed_error():
    vae_only = {"first_stage_model.decoder.conv_in.weight": torch.zeros(512, 4, 3, 3)}
    with pytest.raises(UNetCheckpointError, match="input_blocks.0.0.weight") as caught:
        detect_unet_config(vae_only)
    assert caught.value.key == "model.diffusion_model.input_blocks.0.0.weight"


def test_load_names_missing_and_misshapen_keys():
    checkpoint = random_checkpoint(SD1_LIKE)
    key = CHECKPOINT_PREFIX + "output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    missing = {k: v for k, v in checkpoint.items() if k != key}
    with pytest.raises(UNetCheckpointError, match="attn2.to_k.weight") as caught:
        load_unet(missing, config=SD1_LIKE)
    assert caught.value.key == key
    misshapen = dict(checkpoint, **{key: torch.zeros(64, 31)})
    with pytest.raises(UNetCheckpointError, match=r"\(64, 31\)") as caught:
        load_unet(misshapen, config=SD1_LIKE)
    assert caught.value.key == key


def test_y_required_exactly_for_label_embedding():
    model = ours(SDXL_LIKE, random_checkpoint(SDXL_LIKE))
    (x, t, context, _), _ = inputs(SDXL_LIKE)
    with pytest.raises(ValueError, match="adm_in_channels"):
        model(x, t, context)


@pytest.mark.parametrize("change", [
    dict(num_res_blocks=(2, 2)),
    dict(transformer_depth=(1, 1, 1)),
    dict(num_heads=8, num_head_channels=64),
])
def test_inconsistent_config_is_refused(change):
    with pytest.raises(ValueError):
        dataclasses.replace(SD1_LIKE, **change)
