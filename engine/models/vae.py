"""The Stable Diffusion VAE: the KL-regularised autoencoder of latent diffusion, as ComfyUI runs it.

Scope: the convolutional encoder and decoder of Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent
Diffusion Models", appendix G; CompVis `ldm/modules/diffusionmodules/model.py`), the 1x1 `quant_conv` /
`post_quant_conv` around the latent, the loading of its weights from the original (ldm) or the diffusers layout, and
the detection of its size from the weights. SD1.x, SD2.x and SDXL share this architecture (SDXL only retrained the
weights); the x4 upscaler's VAE is the same network with three levels.

Facts taken from ComfyUI (comfy/ldm/modules/diffusionmodules/model.py, comfy/ldm/models/autoencoder.py, comfy/sd.py):
- GroupNorm with 32 groups and eps 1e-6 everywhere; swish is x * sigmoid(x).
- The downsampling conv has no padding of its own; the input is padded by one zero row/column at the bottom/right
  only (torch convs cannot pad asymmetrically).
- Upsampling is nearest-neighbour x2 followed by a 3x3 conv.
- Only the middle blocks have attention (SD's `attn_resolutions` is empty): one head over all H*W positions, q/k/v
  and the output projection as 1x1 convs, computed with scaled_dot_product_attention as ComfyUI does by default.
- Encoding returns the *mean* of the diagonal Gaussian (the first `embed_dim` channels after `quant_conv`), not a
  sample: ComfyUI stopped sampling in June 2025 (Comfy-Org/ComfyUI#8705, "Don't add tiny bit of random noise when
  VAE encoding"). The latent is raw: the 0.18215 / 0.13025 scale factors belong to the sampler, not to the VAE.
- Decoding returns the network output unclamped, roughly in -1..1; pixel conversion lives in engine/autoencode.py.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import EngineError

log = logging.getLogger(__name__)

NORM_GROUPS = 32  # ldm's Normalize(); not stored in checkpoints, so not a config field
NORM_EPS = 1e-6


class VAEWeightsError(EngineError):
    """A VAE state dict lacks a weight or holds one of the wrong shape; `key` names it (original layout)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"VAE weight {key!r}: {message}")
        self.key = key


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128                              # width of the first level; level i is ch * ch_mult[i] wide
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)    # one entry per resolution level; downscale is 2**(levels - 1)
    num_res_blocks: int = 2                    # ResNet blocks per encoder level (the decoder has one more)
    z_channels: int = 4                        # channels between encoder/decoder and the quant convs
    embed_dim: int = 4                         # latent channels (what the sampler sees)
    in_channels: int = 3                       # image channels into the encoder
    out_channels: int = 3                      # image channels out of the decoder

    @classmethod
    def sd(cls) -> VAEConfig:
        """The VAE of SD1.x, SD2.x and SDXL (kl-f8: 8x downscale, 4 latent channels)."""
        return cls()

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class _Conv2d(nn.Conv2d):
    """A conv whose weights always come from a checkpoint: random initialisation would be wasted work."""

    def reset_parameters(self) -> None:
        pass


class _GroupNorm(nn.GroupNorm):
    def reset_parameters(self) -> None:
        pass


def _norm(channels: int, device, dtype) -> nn.GroupNorm:
    return _GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True, device=device, dtype=dtype)


def _conv(c_in: int, c_out: int, kernel: int, device, dtype, stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    padding = kernel // 2 if padding is None else padding
    return _Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, device=device, dtype=dtype)


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv, twice, plus a 1x1 `nin_shortcut` on the skip path when the width changes."""

    def __init__(self, c_in: int, c_out: int, device=None, dtype=None):
        super().__init__()
        self.norm1 = _norm(c_in, device, dtype)
        self.conv1 = _conv(c_in, c_out, 3, device, dtype)
        self.norm2 = _norm(c_out, device, dtype)
        self.conv2 = _conv(c_out, c_out, 3, device, dtype)
        self.nin_shortcut = _conv(c_in, c_out, 1, device, dtype) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.norm = _norm(channels, device, dtype)
        self.q = _conv(channels, channels, 1, device, dtype)
        self.k = _conv(channels, channels, 1, device, dtype)
        self.v = _conv(channels, channels, 1, device, dtype)
        self.proj_out = _conv(channels, channels, 1, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose width is all channels; contiguous so that SDPA may pick
        # its fused kernels, as it does in ComfyUI
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(2, 3).contiguous() for t in (self.q(h), self.k(h), self.v(h)))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row and column at the bottom and right, as ldm does."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = _conv(channels, channels, 3, device, dtype, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = _conv(channels, channels, 3, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, device, dtype)
        self.attn_1 = AttnBlock(channels, device, dtype)
        self.block_2 = ResnetBlock(channels, channels, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ResNet blocks, then an optional resampler (`downsample` or `upsample`)."""

    def __init__(self, widths: list[tuple[int, int]], resample: str | None, device=None, dtype=None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in, c_out, device, dtype) for c_in, c_out in widths)
        c_last = widths[-1][1]
        if resample == "down":
            self.downsample = Downsample(c_last, device, dtype)
        elif resample == "up":
            self.upsample = Upsample(c_last, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig, device=None, dtype=None):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        levels = len(widths)
        self.conv_in = _conv(config.in_channels, config.ch, 3, device, dtype)
        self.down = nn.ModuleList()
        c = config.ch
        for i, width in enumerate(widths):
            blocks = [(c if j == 0 else width, width) for j in range(config.num_res_blocks)]
            self.down.append(Level(blocks, "down" if i < levels - 1 else None, device, dtype))
            c = width
        self.mid = MidBlock(c, device, dtype)
        self.norm_out = _norm(c, device, dtype)
        self.conv_out = _conv(c, 2 * config.z_channels, 3, device, dtype)  # mean and log-variance

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig, device=None, dtype=None):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        c = widths[-1]
        self.conv_in = _conv(config.z_channels, c, 3, device, dtype)
        self.mid = MidBlock(c, device, dtype)
        # `up` is indexed by level like the encoder's `down` (up.0 is full resolution) but runs from the last level.
        up: list[Level] = []
        for i in reversed(range(len(widths))):
            width = widths[i]
            blocks = [(c if j == 0 else width, width) for j in range(config.num_res_blocks + 1)]
            up.insert(0, Level(blocks, "up" if i > 0 else None, device, dtype))
            c = width
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(c, device, dtype)
        self.conv_out = _conv(c, config.out_channels, 3, device, dtype)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, device, dtype)
        self.decoder = Decoder(config, device, dtype)
        self.quant_conv = _conv(2 * config.z_channels, 2 * config.embed_dim, 1, device, dtype)
        self.post_quant_conv = _conv(config.embed_dim, config.z_channels, 1, device, dtype)

    @property
    def downscale_factor(self) -> int:
        return self.config.downscale_factor

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def encode(self, x: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) in -1..1 -> the posterior mean (B, embed_dim, H/f, W/f); H, W multiples of f."""
        moments = self.quant_conv(self.encoder(x))  # (B, 2 * embed_dim, h, w): mean, then log-variance
        return moments[:, : self.config.embed_dim]

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, embed_dim, h, w) -> pixels (B, 3, h*f, w*f), unclamped."""
        return self.decoder(self.post_quant_conv(z))


# ---------------------------------------------------------------------------------------------------------------
# Weights


_ATTN_WEIGHT = re.compile(r"(en|de)coder\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _diffusers_key_map(levels: int, num_res_blocks: int) -> dict[str, tuple[str, ...]]:
    """Original name -> the diffusers name(s) it may have, for every weight of a VAE of this depth.

    Diffusers numbers decoder levels from the bottom (up_blocks.0 is the lowest resolution) where ldm numbers them
    from the top, renames `nin_shortcut` / `norm_out`, and has two generations of attention names.
    """
    names: dict[str, tuple[str, ...]] = {}

    def resnet(original: str, diffusers: str) -> None:
        for part in ("norm1", "conv1", "norm2", "conv2"):
            for p in ("weight", "bias"):
                names[f"{original}.{part}.{p}"] = (f"{diffusers}.{part}.{p}",)
        for p in ("weight", "bias"):
            names[f"{original}.nin_shortcut.{p}"] = (f"{diffusers}.conv_shortcut.{p}",)

    def mid(side: str) -> None:
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
        attn = f"{side}.mid_block.attentions.0"
        for original, current, legacy in (("norm", "group_norm", "group_norm"), ("q", "to_q", "query"),
                                          ("k", "to_k", "key"), ("v", "to_v", "value"),
                                          ("proj_out", "to_out.0", "proj_attn")):
            for p in ("weight", "bias"):
                names[f"{side}.mid.attn_1.{original}.{p}"] = (f"{attn}.{current}.{p}", f"{attn}.{legacy}.{p}")

    for side in ("encoder", "decoder"):
        for original, diffusers in (("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out")):
            for p in ("weight", "bias"):
                names[f"{side}.{original}.{p}"] = (f"{side}.{diffusers}.{p}",)
        mid(side)
    for i in range(levels):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        u = levels - 1 - i
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}")
        for p in ("weight", "bias"):
            names[f"encoder.down.{i}.downsample.conv.{p}"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv.{p}",)
            names[f"decoder.up.{i}.upsample.conv.{p}"] = (f"decoder.up_blocks.{u}.upsamplers.0.conv.{p}",)
    for conv in ("quant_conv", "post_quant_conv"):
        for p in ("weight", "bias"):
            names[f"{conv}.{p}"] = (f"{conv}.{p}",)
    return names


def _count(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    keys = list(sd)
    levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
    num_res_blocks = _count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    out: dict[str, Tensor] = {}
    for original, candidates in _diffusers_key_map(levels, num_res_blocks).items():
        for name in candidates:
            if name in sd:
                out[original] = sd[name]
                break
    return out


def _is_diffusers(keys) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in keys)


def detect_vae_config(converted: Mapping[str, Tensor]) -> VAEConfig:
    """The VAEConfig of a state dict in the original layout without prefix, read from shapes."""

    def shape(key: str) -> torch.Size:
        if key not in converted:
            raise VAEWeightsError(key, "missing; cannot tell the VAE's size without it")
        return converted[key].shape

    keys = list(converted)
    levels = _count(keys, r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight$")
    if levels == 0:
        raise VAEWeightsError("encoder.down.0.block.0.conv1.weight", "missing; this is not an AutoencoderKL state dict")
    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    return VAEConfig(
        ch=ch,
        ch_mult=tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels)),
        num_res_blocks=_count(keys, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight$"),
        z_channels=shape("decoder.conv_in.weight")[1],
        embed_dim=shape("post_quant_conv.weight")[1],
        in_channels=in_channels,
        out_channels=shape("decoder.conv_out.weight")[0],
    )


def convert_vae_state_dict(sd: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """The VAE weights under `prefix` in `sd`, in the original layout with the prefix removed.

    Accepts the original (ldm) layout, as in full checkpoints (`prefix="first_stage_model."`) and standalone VAE files
    (`prefix=""`), and the diffusers layout of standalone diffusers VAE files. Attention weights stored as (C, C)
    linears or (C, C, 1) 1-D convs become (C, C, 1, 1) convs. Every weight the detected architecture needs is checked
    for presence and shape (VAEWeightsError names the first bad one); weights it does not need (training losses, EMA)
    are ignored.
    """
    stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    renamed = _from_diffusers(stripped) if _is_diffusers(stripped) else stripped
    config = detect_vae_config(renamed)
    expected = AutoencoderKL(config, device="meta").state_dict()
    out: dict[str, Tensor] = {}
    for key, reference in expected.items():
        if key not in renamed:
            raise VAEWeightsError(key, f"missing from the state dict (prefix {prefix!r})")
        tensor = renamed[key]
        if _ATTN_WEIGHT.search(key) and tensor.ndim in (2, 3):
            tensor = tensor.reshape(*tensor.shape[:2], 1, 1)  # (C, C) linear or (C, C, 1) conv1d -> (C, C, 1, 1)
        if tensor.shape != reference.shape:
            raise VAEWeightsError(key, f"has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)} "
                                       f"for {config}")
        out[key] = tensor
    leftover = sorted(set(renamed) - set(out))
    if leftover:
        log.debug("ignored %d VAE keys not used by the network, e.g. %s", len(leftover), leftover[:3])
    return out


def load_vae(sd: Mapping[str, Tensor], prefix: str = "", device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> AutoencoderKL:
    """Build the VAE that `sd` describes on the meta device and load its weights (moved to device/dtype)."""
    weights = convert_vae_state_dict(sd, prefix)
    vae = AutoencoderKL(detect_vae_config(weights), device="meta")
    weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
    vae.load_state_dict(weights, strict=True, assign=True)
    return vae.eval().requires_grad_(False)
