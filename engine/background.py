"""Foreground masks with U^2-Net, computed as the `rembg` tool computes them (rembg/sessions/base.py `normalize`,
rembg/sessions/u2net.py `predict`, `remove(..., only_mask=True)`), for a whole IMAGE batch at once.

Per image, as rembg sees it: the IMAGE pixels as 8-bit RGB (`clip(255 * x)` truncated, ComfyUI's conversion),
resized to 320x320 with Pillow's LANCZOS filter, divided by their maximum (at least 1e-6), normalised with the
ImageNet mean and standard deviation (in float64, then float32). The network returns seven maps; the first (the
fused one) is min-max normalised per image, truncated to 8 bits, resized back to the image's size with Pillow's
LANCZOS filter, and divided by 255: MASK `[B, H, W]` in 0..1, on the CPU like other masks.

The 8-bit steps and Pillow's resizes run on the CPU, because their exact results are Pillow's integer arithmetic;
they cost little next to the network, which runs once for the whole batch on the model's device in float32 (rembg
runs the float32 ONNX export of the same weights).

The weights are found by the model's name in the `background_removal` folder: a local `u2net.pth` (any model
extension) or the known-models registry's entry of that name (a hub download). Between prompts the network stays
in the executor's model cache (engine/residency.py), like checkpoints.
"""
from __future__ import annotations

import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from engine.checkpoints import CheckpointError, read_state_dict
from engine.models.u2net import VARIANTS, U2Net, load_u2net
from engine.residency import ModelCache, ModelKey

FOLDER = "background_removal"
MODELS = ("u2net", "u2netp")  # the names a prompt uses, and under which the model files are found
INPUT_SIZE = 320
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_u2net_file(path: Path, model: str, device: torch.device | str) -> U2Net:
    """The network of a `u2net.pth` / `u2netp.pth` file (or a .safetensors of the same keys), in float32."""
    return load_u2net(read_weights(path), VARIANTS[model](), device=device, dtype=torch.float32)


def read_weights(path: Path) -> Mapping[str, Tensor]:
    """The tensors of a model file. The published `u2net.pth` was saved by PyTorch 0.4 in the legacy (pre-zip)
    pickle format, which cannot be memory-mapped: such files are read whole, still with `weights_only=True`."""
    if path.suffix.lower() in (".safetensors", ".sft") or zipfile.is_zipfile(path):
        return read_state_dict(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle raises many types for a damaged or foreign file
        raise CheckpointError(f"{path.name} could not be read as a model file: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} holds a {type(data).__name__}, not a dictionary of tensors")
    return {k: v for k, v in data.items() if isinstance(v, Tensor)}


@contextmanager
def u2net_in_use(path: Path, model: str, device: torch.device, cache: ModelCache | None = None) -> Iterator[U2Net]:
    """The network of `path` for the duration of the block: from `cache` (loaded there when not resident, pinned
    while in use), or loaded for this call alone without a cache."""
    if cache is None:
        yield load_u2net_file(path, model, device)
        return

    def load() -> tuple[U2Net, list[U2Net]]:
        net = load_u2net_file(path, model, device)
        return net, [net]

    key = ModelKey(str(path.resolve()), model, torch.float32, torch.device(device))
    with cache.resident(key, load, folder=FOLDER, estimate=path.stat().st_size).use() as net:
        yield net


def to_uint8(images: Tensor) -> np.ndarray:
    """IMAGE `[B, H, W, C]` -> 8-bit RGB `[B, H, W, 3]`: ComfyUI's `clip(255 * x, 0, 255)` truncated, in the
    image's own dtype; an alpha channel is dropped (rembg converts to RGB)."""
    values = images[..., :3].detach().cpu()
    values = (values.float() if values.dtype == torch.bfloat16 else values).numpy()  # numpy has no bfloat16
    return np.clip(255.0 * values, 0, 255).astype(np.uint8)


def preprocess(pixels: np.ndarray) -> Tensor:
    """8-bit RGB `[B, H, W, 3]` -> the network's input `[B, 3, 320, 320]` float32, on the CPU."""
    resized = np.stack([np.asarray(Image.fromarray(image, "RGB").resize((INPUT_SIZE, INPUT_SIZE),
                                                                         Image.Resampling.LANCZOS))
                        for image in pixels])
    x = torch.from_numpy(resized).to(torch.float64)  # (B, 320, 320, 3)
    peak = x.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    x = x / peak
    x = (x - torch.tensor(MEAN, dtype=torch.float64)) / torch.tensor(STD, dtype=torch.float64)
    return x.to(torch.float32).permute(0, 3, 1, 2).contiguous()  # (B, 3, 320, 320)


def postprocess(fused: Tensor, height: int, width: int) -> Tensor:
    """The fused map `[B, 1, 320, 320]` -> MASK `[B, height, width]` float32 on the CPU."""
    pred = fused[:, 0].float()  # (B, 320, 320)
    low = pred.amin(dim=(1, 2), keepdim=True)
    high = pred.amax(dim=(1, 2), keepdim=True)
    span = high - low
    # a constant map has no foreground (rembg would divide by zero here and cast NaN to 8 bits)
    scaled = torch.where(span > 0, (pred - low) / torch.where(span > 0, span, 1.0), 0.0)
    levels = (scaled * 255).to(torch.uint8).cpu().numpy()  # truncated, as numpy's astype("uint8")
    masks = [np.asarray(Image.fromarray(level, "L").resize((width, height), Image.Resampling.LANCZOS))
             for level in levels]
    return torch.from_numpy(np.stack(masks).astype(np.float32) / 255.0)


@torch.inference_mode()
def estimate_foreground(net: U2Net, images: Tensor) -> Tensor:
    """IMAGE `[B, H, W, C]` -> MASK `[B, H, W]`: rembg's `only_mask` result for each image, divided by 255."""
    height, width = images.shape[1:3]
    x = preprocess(to_uint8(images)).to(device=net.device, dtype=net.dtype)
    fused = net(x)[0]
    return postprocess(fused, height, width)
