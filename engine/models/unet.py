"""The latent-diffusion UNet of the original Stable Diffusion checkpoints.

Scope: the noise-prediction network of SD1.x, SD2.x, SDXL base, SDXL refiner and their inpainting variants (9 input
channels: latent, mask, masked-image latent), in the layout of the original checkpoints (`model.diffusion_model.*`),
so that a checkpoint's UNet loads with `load_state_dict(..., assign=True)` without renaming a key. The network
predicts whatever the checkpoint was trained on (eps or v); the parameterisation is the sampler's business.

Numerics follow ComfyUI's `comfy/ldm/modules/diffusionmodules/openaimodel.py` and `comfy/ldm/modules/attention.py`:
the sinusoidal timestep embedding is computed in float32 and cast to the parameter dtype; everything else (GroupNorm
and LayerNorm included) runs in the parameter dtype; attention is `scaled_dot_product_attention`; the feed-forward is
GEGLU; on the way up each Upsample resizes to the spatial size of the skip connection it is about to meet, which is
what makes latents whose sides are not a multiple of 2**levels work.

References:
- Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (the LDM UNet).
- Podell et al. 2023, "SDXL" (label embedding of pooled text and size/crop conditioning, deeper transformers).
- Dhariwal & Nichol 2021, "Diffusion Models Beat GANs" (the openaimodel ResBlock/UNet this code descends from).
- ComfyUI `comfy/model_detection.py` (config from key names and shapes), `comfy/supported_models.py` (head counts).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import EngineError

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "model.diffusion_model."


class UNetCheckpointError(EngineError):
    """A state dict is not (or not entirely) the UNet it was taken for; `key` names the offending entry."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting models (latent + mask + masked-image latent)
    out_channels: int = 4
    model_channels: int = 320  # width of the first level; the timestep embedding is 4x this
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of each level, in units of model_channels
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)  # ResBlocks per level going down; going up has one more
    # Transformer blocks after each ResBlock going down, one entry per ResBlock (0 = no SpatialTransformer there).
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1, 1, 1, 0, 0)
    # The same for each output block, listed like the down path (level 0 first): output_blocks[k] reads entry [-1-k].
    transformer_depth_output: tuple[int, ...] = (1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0)
    transformer_depth_middle: int | None = 1  # None: the middle block is a lone ResBlock (no attention)
    num_heads: int | None = 8  # fixed head count (SD1.x) ...
    num_head_channels: int | None = None  # ... or fixed head width (SD2.x, SDXL: 64); exactly one of the two is set
    context_dim: int | None = 768  # width of the text conditioning; None only for a UNet without transformers
    use_linear_in_transformer: bool = False  # proj_in/proj_out are Linear (SD2.x, SDXL) rather than 1x1 convs (SD1.x)
    adm_in_channels: int | None = None  # width of `y` (SDXL base 2816, refiner 2560); None: no label embedding

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if len(self.num_res_blocks) != levels:
            raise ValueError(f"num_res_blocks has {len(self.num_res_blocks)} entries for {levels} levels")
        if len(self.transformer_depth) != sum(self.num_res_blocks):
            raise ValueError(f"transformer_depth needs one entry per down ResBlock ({sum(self.num_res_blocks)}), "
                             f"got {len(self.transformer_depth)}")
        if len(self.transformer_depth_output) != sum(n + 1 for n in self.num_res_blocks):
            raise ValueError(f"transformer_depth_output needs one entry per output block "
                             f"({sum(n + 1 for n in self.num_res_blocks)}), got {len(self.transformer_depth_output)}")
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError("set exactly one of num_heads and num_head_channels")
        has_attention = any(self.transformer_depth) or any(self.transformer_depth_output) or \
            self.transformer_depth_middle is not None
        if has_attention and self.context_dim is None:
            raise ValueError("a UNet with transformers needs context_dim")

    def attention_heads(self, channels: int) -> tuple[int, int]:
        """(heads, head width) of a SpatialTransformer over `channels` channels."""
        if self.num_head_channels is not None:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    @classmethod
    def sd15(cls) -> UNetConfig:
        return cls()

    @classmethod
    def sd15_inpaint(cls) -> UNetConfig:
        return cls(in_channels=9)

    @classmethod
    def sd21(cls) -> UNetConfig:
        return cls(num_heads=None, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)

    @classmethod
    def sdxl_base(cls) -> UNetConfig:
        return cls(channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
                   transformer_depth=(0, 0, 2, 2, 10, 10), transformer_depth_output=(0, 0, 0, 2, 2, 2, 10, 10, 10),
                   transformer_depth_middle=10, num_heads=None, num_head_channels=64, context_dim=2048,
                   use_linear_in_transformer=True, adm_in_channels=2816)

    @classmethod
    def sdxl_refiner(cls) -> UNetConfig:
        return cls(model_channels=384, transformer_depth=(0, 0, 4, 4, 4, 4, 0, 0),
                   transformer_depth_output=(0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0), transformer_depth_middle=4,
                   num_heads=None, num_head_channels=64, context_dim=1280, use_linear_in_transformer=True,
                   adm_in_channels=2560)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps [B], cosines first, in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added in between, and a residual connection."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels, **kw), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1, **kw))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels, **kw))
        # Index 2 was dropout in training; the Identity keeps the checkpoint's `out_layers.3`.
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels, **kw), nn.SiLU(), nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, **kw))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1, **kw))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, C, 1, 1)
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int, *, device=None, dtype=None):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, *, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        # An odd-sized level downsampled to ceil(n/2); doubling would overshoot, so meet the skip's size instead.
        x = F.interpolate(x, size=size or (x.shape[-2] * 2, x.shape[-1] * 2), mode="nearest")
        return self.conv(x)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (over `x` itself when context is None)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False, **kw)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False, **kw)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False, **kw)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim, **kw))  # `to_out.0` in the checkpoint

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        B, _, inner = q.shape
        q, k, v = (t.view(B, -1, self.heads, inner // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, -1, inner)  # (B, T, H*D)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, *, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, *, device=None, dtype=None):
        super().__init__()
        # Index 1 was dropout in training; the Identity keeps the checkpoint's `net.2`.
        self.net = nn.Sequential(GEGLU(dim, dim * mult, device=device, dtype=dtype), nn.Identity(),
                                 nn.Linear(dim * mult, dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward; each with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.attn1 = CrossAttention(dim, None, heads, dim_head, **kw)
        self.ff = FeedForward(dim, **kw)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, **kw)
        self.norm1 = nn.LayerNorm(dim, **kw)
        self.norm2 = nn.LayerNorm(dim, **kw)
        self.norm3 = nn.LayerNorm(dim, **kw)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """Transformer blocks over the pixels of a feature map, between an input and an output projection."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool,
                 *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6, **kw)
        self.proj_in = nn.Linear(channels, inner_dim, **kw) if use_linear else nn.Conv2d(channels, inner_dim, 1, **kw)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, **kw) for _ in range(depth)])
        self.proj_out = nn.Linear(inner_dim, channels, **kw) if use_linear else nn.Conv2d(inner_dim, channels, 1, **kw)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.movedim(1, 3).flatten(1, 2)  # (B, H*W, C)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, -1).movedim(3, 1)  # (B, C, H, W)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


class UNetBlock(nn.Sequential):
    """One entry of input_blocks / middle_block / output_blocks: each layer gets the inputs it needs."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The LDM UNet: `forward(x, timesteps, context, y)` -> the model output, same shape as the latent part of x.

    Parameters are left uninitialised (built on the meta device, then given empty storage on `device`): construct
    on "meta" and `load_state_dict(..., assign=True)`, or use `load_unet`.
    """

    def __init__(self, config: UNetConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        kw = dict(device="meta", dtype=dtype)
        mc = config.model_channels
        time_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, time_dim, **kw), nn.SiLU(), nn.Linear(time_dim, time_dim, **kw))
        self.label_emb = None
        if config.adm_in_channels is not None:
            self.label_emb = nn.Sequential(nn.Sequential(  # nested as in the checkpoint: `label_emb.0.0`
                nn.Linear(config.adm_in_channels, time_dim, **kw), nn.SiLU(), nn.Linear(time_dim, time_dim, **kw)))

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = config.attention_heads(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, config.context_dim,
                                      config.use_linear_in_transformer, **kw)

        # Down: conv_in, then per level ResBlock(+transformer) x num_res_blocks and a Downsample (not after the last).
        depths = iter(config.transformer_depth)
        self.input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(config.in_channels, mc, 3, padding=1, **kw))])
        skip_channels = [mc]
        ch = mc
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks[level]):
                layers = [ResBlock(ch, time_dim, mult * mc, **kw)]
                ch = mult * mc
                depth = next(depths)
                if depth > 0:
                    layers.append(transformer(ch, depth))
                self.input_blocks.append(UNetBlock(*layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(UNetBlock(Downsample(ch, **kw)))
                skip_channels.append(ch)

        middle = [ResBlock(ch, time_dim, ch, **kw)]
        if config.transformer_depth_middle is not None:
            middle += [transformer(ch, config.transformer_depth_middle), ResBlock(ch, time_dim, ch, **kw)]
        self.middle_block = UNetBlock(*middle)

        # Up: per level (deepest first) num_res_blocks + 1 ResBlocks over [h, skip], the last of a level upsamples.
        depths = reversed(config.transformer_depth_output)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skip_channels.pop(), time_dim, mult * mc, **kw)]
                ch = mult * mc
                depth = next(depths)
                if depth > 0:
                    layers.append(transformer(ch, depth))
                if level > 0 and i == config.num_res_blocks[level]:
                    layers.append(Upsample(ch, **kw))
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(nn.GroupNorm(32, ch, **kw), nn.SiLU(),
                                 nn.Conv2d(mc, config.out_channels, 3, padding=1, **kw))

        target = torch.device(device) if device is not None else torch.get_default_device()
        if target.type != "meta":
            self.to_empty(device=target)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        """x [B, in_channels, H, W], timesteps [B] (discrete, float), context [B, T, context_dim], y [B, adm_in].

        Inputs are cast to the parameter dtype; the output [B, out_channels, H, W] is in the parameter dtype.
        """
        if (y is None) != (self.label_emb is None):
            raise ValueError("y must be given exactly when the model has a label embedding "
                             f"(adm_in_channels={self.config.adm_in_channels})")
        dtype = self.time_embed[0].weight.dtype
        t_emb = timestep_embedding(timesteps.to(x.device), self.config.model_channels).to(dtype)
        emb = self.time_embed(t_emb)
        if self.label_emb is not None:
            emb = emb + self.label_emb(y.to(dtype))
        context = context.to(dtype)

        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, tuple(skips[-1].shape[-2:]) if skips else None)
        return self.out(h)


# -- checkpoints ------------------------------------------------------------------------------------------------------

def unet_keys(state_dict: Mapping[str, Tensor], prefix: str = CHECKPOINT_PREFIX) -> dict[str, Tensor]:
    """The UNet's entries of a checkpoint, with `prefix` stripped (the keys `UNetModel` expects)."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _count_indexed(keys: list[str], template: str) -> int:
    """How many consecutive n = 0, 1, ... have some key starting with template.format(n)."""
    n = 0
    while any(k.startswith(template.format(n)) for k in keys):
        n += 1
    return n


def _transformer_info(sd: Mapping[str, Tensor], keys: list[str], block: str) -> tuple[int, int, bool] | None:
    """(depth, context_dim, use_linear) of the SpatialTransformer at `{block}1.`, or None if there is none."""
    prefix = f"{block}1.transformer_blocks."
    depth = _count_indexed(keys, prefix + "{}.")
    if depth == 0:
        return None
    context_dim = sd[f"{prefix}0.attn2.to_k.weight"].shape[1]
    use_linear = sd[f"{block}1.proj_in.weight"].ndim == 2
    return depth, context_dim, use_linear


def detect_unet_config(state_dict: Mapping[str, Tensor], prefix: str = CHECKPOINT_PREFIX) -> UNetConfig:
    """Derive the UNetConfig from key names and shapes, as ComfyUI's `model_detection.detect_unet_config` does.

    The head layout is not in the weights; like ComfyUI's supported-model table, 1x1-conv projections (SD1.x) get
    8 heads and linear projections (SD2.x, SDXL) get 64-channel heads.
    """
    first = f"{prefix}input_blocks.0.0.weight"
    if first not in state_dict:
        raise UNetCheckpointError(f"not an LDM UNet: {first!r} is missing", first)
    keys = [k for k in state_dict if k.startswith(prefix)]
    conv_in = state_dict[first]
    model_channels, in_channels = conv_in.shape[0], conv_in.shape[1]
    out_key = f"{prefix}out.2.weight"
    out_channels = state_dict[out_key].shape[0] if out_key in state_dict else 4
    label_key = f"{prefix}label_emb.0.0.weight"
    adm_in_channels = state_dict[label_key].shape[1] if label_key in state_dict else None

    # Walk the down path; input block n mirrors output block count-1-n, whose depth is recorded alongside.
    count = _count_indexed(keys, f"{prefix}input_blocks.{{}}.")
    num_res_blocks, channel_mult, depth_in, depth_out = [], [], [], []
    level_blocks, level_mult = 0, 0
    context_dim, use_linear = None, False
    for n in range(count):
        block = f"{prefix}input_blocks.{n}."
        mirror = f"{prefix}output_blocks.{count - 1 - n}."
        out_info = _transformer_info(state_dict, keys, mirror)
        if f"{block}0.op.weight" in state_dict:  # a Downsample closes the level
            num_res_blocks.append(level_blocks)
            channel_mult.append(level_mult)
            level_blocks, level_mult = 0, 0
            depth_out.append(out_info[0] if out_info else 0)
            continue
        if f"{block}0.in_layers.0.weight" in state_dict:
            level_blocks += 1
            level_mult = state_dict[f"{block}0.out_layers.3.weight"].shape[0] // model_channels
            info = _transformer_info(state_dict, keys, block)
            depth_in.append(info[0] if info else 0)
            if info and context_dim is None:
                _, context_dim, use_linear = info
        if f"{mirror}0.in_layers.0.weight" in state_dict:
            depth_out.append(out_info[0] if out_info else 0)
    num_res_blocks.append(level_blocks)
    channel_mult.append(level_mult)

    if f"{prefix}middle_block.1.proj_in.weight" in state_dict:
        depth_middle = _count_indexed(keys, f"{prefix}middle_block.1.transformer_blocks.{{}}.")
        if context_dim is None:
            _, context_dim, use_linear = _transformer_info(state_dict, keys, f"{prefix}middle_block.")
    elif f"{prefix}middle_block.0.in_layers.0.weight" in state_dict:
        depth_middle = None
    else:
        key = f"{prefix}middle_block.0.in_layers.0.weight"
        raise UNetCheckpointError(f"UNet without a middle block is not supported: {key!r} is missing", key)

    heads = dict(num_heads=None, num_head_channels=64) if use_linear else dict(num_heads=8, num_head_channels=None)
    try:
        return UNetConfig(in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                          channel_mult=tuple(channel_mult), num_res_blocks=tuple(num_res_blocks),
                          transformer_depth=tuple(depth_in), transformer_depth_output=tuple(depth_out),
                          transformer_depth_middle=depth_middle, context_dim=context_dim,
                          use_linear_in_transformer=use_linear, adm_in_channels=adm_in_channels, **heads)
    except ValueError as e:
        raise UNetCheckpointError(f"inconsistent UNet keys under {prefix!r}: {e}", first) from e


def load_unet(state_dict: Mapping[str, Tensor], prefix: str = CHECKPOINT_PREFIX, *, config: UNetConfig | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> UNetModel:
    """Build the UNet of a checkpoint (config detected unless given) with its weights assigned.

    Tensors are cast to `dtype` (None: the default dtype) and moved to `device` (None: left where they are).

    Every expected key must be present with the expected shape (UNetCheckpointError names the first that is not);
    extra keys under `prefix` are logged and ignored, as ComfyUI does.
    """
    config = config or detect_unet_config(state_dict, prefix)
    model = UNetModel(config, device="meta", dtype=dtype)
    weights = unet_keys(state_dict, prefix)
    loaded = {}
    for key, expected in model.state_dict().items():
        if key not in weights:
            raise UNetCheckpointError(f"checkpoint lacks {prefix + key!r}", prefix + key)
        if weights[key].shape != expected.shape:
            raise UNetCheckpointError(f"{prefix + key!r} has shape {tuple(weights[key].shape)}, "
                                      f"this UNet expects {tuple(expected.shape)}", prefix + key)
        loaded[key] = weights[key].to(device=device, dtype=expected.dtype)
    extra = sorted(weights.keys() - loaded.keys())
    if extra:
        log.warning("ignoring %d unexpected UNet keys, e.g. %s", len(extra), prefix + extra[0])
    model.load_state_dict(loaded, assign=True)
    return model


__all__ = ["UNetConfig", "UNetModel", "UNetCheckpointError", "detect_unet_config", "load_unet", "unet_keys",
           "timestep_embedding", "CHECKPOINT_PREFIX"]
