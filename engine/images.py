"""Conversions between ComfyUI's IMAGE / MASK tensors and image files.

IMAGE is `[B, H, W, C]` float in 0..1 (C = 3, or 4 with alpha); MASK is `[B, H, W]` in 0..1. Pixel conversion
matches ComfyUI's: `clip(255 * x, 0, 255)` truncated to uint8 on save, `x / 255` on load.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence, PngImagePlugin

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image `[H, W, C]` (C = 1, 3 or 4) as a Pillow image."""
    channels = image.shape[-1]
    if channels not in _MODES:
        raise ValueError(f"an image needs 1, 3 or 4 channels, this one has {channels}")
    pixels = np.clip(255.0 * image.detach().float().cpu().numpy(), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, _MODES[channels])


def from_pil(image: Image.Image) -> torch.Tensor:
    """A Pillow image as `[H, W, C]` float32 in 0..1."""
    return torch.from_numpy(np.array(image).astype(np.float32) / 255.0)


def encode_png(image: Image.Image, text: dict[str, str] | None = None, compress_level: int = 4) -> bytes:
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def load_image(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every frame of an image file as IMAGE `[N, H, W, 3]` and MASK `[N, H, W]`, as ComfyUI's LoadImage does:
    the mask is 1 - alpha (transparent means masked), 64x64 zeros when there is no alpha, and frames whose size
    differs from the first are skipped."""
    images, masks = [], []
    with Image.open(path) as opened:
        for frame in ImageSequence.Iterator(opened):
            frame = _eight_bit_range(ImageOps.exif_transpose(frame))
            rgb = from_pil(frame.convert("RGB"))
            if images and rgb.shape != images[0].shape:
                continue
            images.append(rgb)
            masks.append(_mask_from_alpha(frame))
            if opened.format == "MPO":  # multi-picture JPEGs: the extra frames are depth maps or previews
                break
    if not images:
        raise ValueError(f"{path.name} holds no image frames")
    return torch.stack(images), torch.stack(masks)


def _eight_bit_range(frame: Image.Image) -> Image.Image:
    """ComfyUI divides 32-bit integer images ('I') by 255 before converting to RGB. Recent Pillow opens 16-bit
    PNGs as 'I;16' instead, which ComfyUI's check misses (they would clip to white), so those are treated alike."""
    if frame.mode.startswith("I;16"):
        frame = frame.convert("I")
    if frame.mode == "I":
        frame = frame.point(lambda value: value * (1 / 255))
    return frame


def _mask_from_alpha(frame: Image.Image) -> torch.Tensor:
    if "A" in frame.getbands():
        return 1.0 - from_pil(frame.getchannel("A"))
    if frame.mode == "P" and "transparency" in frame.info:
        return 1.0 - from_pil(frame.convert("RGBA").getchannel("A"))
    return torch.zeros((64, 64), dtype=torch.float32)


def load_channel(path: Path, channel: str) -> torch.Tensor:
    """One channel of an image file as MASK `[1, H, W]`, as ComfyUI's LoadImageMask does (alpha inverted)."""
    with Image.open(path) as opened:
        frame = ImageOps.exif_transpose(opened)
        if frame.getbands() != ("R", "G", "B", "A"):
            frame = _eight_bit_range(frame).convert("RGBA")
        band = channel[0].upper()
        if band not in frame.getbands():
            return torch.zeros((1, 64, 64), dtype=torch.float32)
        mask = from_pil(frame.getchannel(band))
    return (1.0 - mask if band == "A" else mask).unsqueeze(0)
