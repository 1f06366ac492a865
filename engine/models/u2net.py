"""U^2-Net, the salient object detector that `rembg` runs for background removal.

Scope: the network of Qin et al. 2020 ("U^2-Net: Going Deeper with Nested U-Structure for Salient Object
Detection", Pattern Recognition 106), in its two published sizes: `u2net` (176 MB, 44.0M parameters) and the small
`u2netp` (4.7 MB, 1.13M parameters), with the parameter names of the authors' `u2net.pth` / `u2netp.pth` state
dicts (xuebinqin/U-2-Net, model/u2net.py), and the loading of those weights.

The network is a U-Net of U-Nets: each of its eleven stages is a residual U-block RSU-L (Fig. 2 of the paper), a
small encoder-decoder of height L whose output is added to its input convolution. Six encoder stages (RSU-7, 6, 5,
4, then two RSU-4F) and five decoder stages mirror each other; a 3x3 "side" convolution reads one map from each
decoder stage and from the last encoder stage, each map is upsampled to the input's size, and a 1x1 convolution
fuses the six. Facts of the published model:
- Every convolution of a block is REBNCONV: 3x3 conv (padding = dilation) -> BatchNorm (eps 1e-5) -> ReLU.
- Downsampling is 2x2 max pooling with stride 2 and `ceil_mode=True`; upsampling is bilinear with
  `align_corners=False` to the size of the map it joins (`_upsample_like` in the original).
- RSU-L: convs 1..L-1 at dilation 1 with a pool between each, conv L at dilation 2, then the decoder convs
  (L-1)d..1d on the concatenation of the upsampled map and the skip. RSU-4F replaces pooling by dilation 1, 2, 4, 8
  (decoder 4, 2, 1) and keeps the resolution.
- The forward pass returns seven maps, each through a sigmoid: the fused map first, then the six side outputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import EngineError

log = logging.getLogger(__name__)


class U2NetWeightsError(EngineError):
    """A U^2-Net state dict lacks a weight or holds one of the wrong shape; `key` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"U^2-Net weight {key!r}: {message}")
        self.key = key


class RSUSpec(NamedTuple):
    height: int          # L of RSU-L: 4..7 pooled levels, or 4 for the dilated RSU-4F
    in_ch: int
    mid_ch: int
    out_ch: int
    dilated: bool = False  # RSU-4F: dilations instead of pooling, at one resolution


@dataclass(frozen=True)
class U2NetConfig:
    # encoder stages stage1..stage6, each at half the resolution of the one before
    encoder: tuple[RSUSpec, ...] = (
        RSUSpec(7, 3, 32, 64), RSUSpec(6, 64, 32, 128), RSUSpec(5, 128, 64, 256), RSUSpec(4, 256, 128, 512),
        RSUSpec(4, 512, 256, 512, True), RSUSpec(4, 512, 256, 512, True))
    # decoder stages stage5d..stage1d; each reads its upsampled predecessor concatenated with the encoder's skip
    decoder: tuple[RSUSpec, ...] = (
        RSUSpec(4, 1024, 256, 512, True), RSUSpec(4, 1024, 128, 256), RSUSpec(5, 512, 64, 128),
        RSUSpec(6, 256, 32, 64), RSUSpec(7, 128, 16, 64))
    out_ch: int = 1  # channels of each side output; the fused map has one

    @classmethod
    def u2net(cls) -> U2NetConfig:
        """The full model (`u2net.pth`)."""
        return cls()

    @classmethod
    def u2netp(cls) -> U2NetConfig:
        """The small model (`u2netp.pth`): every stage 64 wide with 16 middle channels."""
        return cls(
            encoder=(RSUSpec(7, 3, 16, 64), RSUSpec(6, 64, 16, 64), RSUSpec(5, 64, 16, 64), RSUSpec(4, 64, 16, 64),
                     RSUSpec(4, 64, 16, 64, True), RSUSpec(4, 64, 16, 64, True)),
            decoder=(RSUSpec(4, 128, 16, 64, True), RSUSpec(4, 128, 16, 64), RSUSpec(5, 128, 16, 64),
                     RSUSpec(6, 128, 16, 64), RSUSpec(7, 128, 16, 64)))

    @property
    def side_channels(self) -> tuple[int, ...]:
        """Input widths of side1..side6: the outputs of stage1d..stage5d, then of stage6."""
        return tuple(spec.out_ch for spec in reversed(self.decoder)) + (self.encoder[-1].out_ch,)


VARIANTS = {"u2net": U2NetConfig.u2net, "u2netp": U2NetConfig.u2netp}


class _Conv2d(nn.Conv2d):
    """A conv whose weights always come from a file: random initialisation would be wasted work."""

    def reset_parameters(self) -> None:
        pass


class _BatchNorm2d(nn.BatchNorm2d):
    """Inference-only BatchNorm: running statistics and affine weights come from the file."""

    def reset_parameters(self) -> None:
        pass


def _pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 2, stride=2, ceil_mode=True)


def _upsample_like(x: Tensor, target: Tensor) -> Tensor:
    return F.interpolate(x, size=target.shape[-2:], mode="bilinear", align_corners=False)


class REBNCONV(nn.Module):
    """3x3 conv -> BatchNorm -> ReLU; the names are the original's (conv_s1, bn_s1)."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1, device=None, dtype=None):
        super().__init__()
        self.conv_s1 = _Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, device=device, dtype=dtype)
        self.bn_s1 = _BatchNorm2d(out_ch, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn_s1(self.conv_s1(x)))


class RSU(nn.Module):
    """Residual U-block RSU-L (or RSU-4F): `rebnconvin`, encoder convs `rebnconv1..L`, decoder convs
    `rebnconv(L-1)d..1d`; the output is the decoder's plus the input conv's."""

    def __init__(self, spec: RSUSpec, device=None, dtype=None):
        super().__init__()
        L, mid = spec.height, spec.mid_ch
        self.pooled = not spec.dilated
        # dilations of the encoder convs 1..L and of the decoder convs (L-1)d..1d
        down = [1] * (L - 1) + [2] if self.pooled else [2 ** i for i in range(L)]
        up = [1] * (L - 1) if self.pooled else [2 ** i for i in reversed(range(L - 1))]
        self.rebnconvin = REBNCONV(spec.in_ch, spec.out_ch, 1, device, dtype)
        for i, dilation in enumerate(down, start=1):
            self.add_module(f"rebnconv{i}", REBNCONV(spec.out_ch if i == 1 else mid, mid, dilation, device, dtype))
        for i, dilation in zip(range(L - 1, 0, -1), up):
            self.add_module(f"rebnconv{i}d", REBNCONV(2 * mid, spec.out_ch if i == 1 else mid, dilation,
                                                      device, dtype))
        self.height = L

    def forward(self, x: Tensor) -> Tensor:
        L = self.height
        hxin = self.rebnconvin(x)
        skips = []  # hx1 .. hx(L-1), each at its level's resolution
        h = hxin
        for i in range(1, L):
            h = getattr(self, f"rebnconv{i}")(h)
            skips.append(h)
            if self.pooled and i < L - 1:
                h = _pool(h)
        h = getattr(self, f"rebnconv{L}")(h)  # the bottom, dilated, at the lowest resolution
        for i in range(L - 1, 0, -1):
            h = getattr(self, f"rebnconv{i}d")(torch.cat((h, skips[i - 1]), dim=1))
            if self.pooled and i > 1:
                h = _upsample_like(h, skips[i - 2])
        return h + hxin


class U2Net(nn.Module):
    def __init__(self, config: U2NetConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        for i, spec in enumerate(config.encoder, start=1):
            self.add_module(f"stage{i}", RSU(spec, device, dtype))
        for i, spec in zip(range(len(config.decoder), 0, -1), config.decoder):
            self.add_module(f"stage{i}d", RSU(spec, device, dtype))
        for i, channels in enumerate(config.side_channels, start=1):
            self.add_module(f"side{i}", _Conv2d(channels, config.out_ch, 3, padding=1, device=device, dtype=dtype))
        self.outconv = _Conv2d(len(config.side_channels) * config.out_ch, 1, 1, device=device, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.outconv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.outconv.weight.device

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Normalised RGB (B, 3, H, W) -> seven saliency maps (B, 1, H, W) in 0..1: fused, then side1..side6."""
        stages = len(self.config.encoder)
        # encoder: hx1..hx6, pooling between stages
        skips = []
        h = x
        for i in range(1, stages + 1):
            h = getattr(self, f"stage{i}")(h)
            skips.append(h)
            if i < stages:
                h = _pool(h)
        # decoder: stage5d..stage1d, each on its upsampled predecessor joined with the skip of its level
        decoded = [skips[-1]]  # hx6, then hx5d .. hx1d
        for i in range(stages - 1, 0, -1):
            h = _upsample_like(h, skips[i - 1])
            h = getattr(self, f"stage{i}d")(torch.cat((h, skips[i - 1]), dim=1))
            decoded.append(h)
        # side outputs from hx1d .. hx5d and hx6, each brought to the input's size, then fused
        sides = []
        for i, feature in enumerate(reversed(decoded), start=1):
            side = getattr(self, f"side{i}")(feature)
            sides.append(side if i == 1 else _upsample_like(side, sides[0]))
        fused = self.outconv(torch.cat(sides, dim=1))
        return tuple(torch.sigmoid(d) for d in (fused, *sides))


# ---------------------------------------------------------------------------------------------------------------
# Weights

_OPTIONAL_SUFFIX = ".num_batches_tracked"  # BatchNorm's training counter: absent from some exports, unused here


def _without_wrapper(sd: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Files saved from a DataParallel model carry `module.` before every key: the only renaming there is."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def detect_u2net_config(sd: Mapping[str, Tensor]) -> U2NetConfig:
    """The published size whose first conv matches the state dict's (32 middle channels: u2net, 16: u2netp)."""
    sd = _without_wrapper(sd)
    key = "stage1.rebnconv1.conv_s1.weight"
    if key not in sd:
        raise U2NetWeightsError(key, "missing; this is not a U^2-Net state dict")
    for make in VARIANTS.values():
        config = make()
        if sd[key].shape[0] == config.encoder[0].mid_ch:
            return config
    raise U2NetWeightsError(key, f"has shape {tuple(sd[key].shape)}, which matches neither u2net nor u2netp")


def convert_u2net_state_dict(sd: Mapping[str, Tensor], config: U2NetConfig) -> dict[str, Tensor]:
    """The weights `config` needs, each checked for presence and shape (a DataParallel `module.` prefix removed);
    keys the network does not use are ignored (logged)."""
    renamed = _without_wrapper(sd)
    with torch.device("meta"):
        expected = U2Net(config).state_dict()
    out: dict[str, Tensor] = {}
    for key, reference in expected.items():
        if key not in renamed:
            if key.endswith(_OPTIONAL_SUFFIX):
                out[key] = torch.zeros((), dtype=torch.long)
                continue
            raise U2NetWeightsError(key, "missing from the state dict")
        tensor = renamed[key]
        if tensor.shape != reference.shape:
            raise U2NetWeightsError(key, f"has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}")
        out[key] = tensor
    leftover = sorted(set(renamed) - set(out))
    if leftover:
        log.debug("ignored %d U^2-Net keys not used by the network, e.g. %s", len(leftover), leftover[:3])
    return out


def load_u2net(sd: Mapping[str, Tensor], config: U2NetConfig | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> U2Net:
    """Build U^2-Net on the meta device and load `sd` into it (moved to device/dtype), in eval mode: BatchNorm uses
    the stored running statistics. Without `config`, the size is read from the weights."""
    config = config or detect_u2net_config(sd)
    weights = convert_u2net_state_dict(sd, config)
    net = U2Net(config, device="meta")
    weights = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in weights.items()}
    net.load_state_dict(weights, strict=True, assign=True)
    return net.eval().requires_grad_(False)
