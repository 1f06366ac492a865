"""ComfyUI's `common_upscale` for channels-first tensors `[B, C, H, W]`: an optional centre crop to the target
aspect ratio, then the method: `torch.nn.functional.interpolate` modes, `lanczos` (Pillow's filter on 8-bit
pixels, image by image, as comfy/utils.py `lanczos` does), or `bislerp` (spherical interpolation of each pixel's
channel vector, which keeps latent norms)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

INTERPOLATE_MODES = ("nearest-exact", "bilinear", "area", "bicubic")
_PIL_MODES = {3: "RGB", 4: "RGBA"}


def common_upscale(samples: torch.Tensor, width: int, height: int, method: str,
                   crop: str = "disabled") -> torch.Tensor:
    if crop == "center":
        samples = center_crop_to_aspect(samples, width, height)
    if method == "bislerp":
        return bislerp(samples, width, height)
    if method == "lanczos":
        return lanczos(samples, width, height)
    if method not in INTERPOLATE_MODES:
        raise ValueError(f"unknown upscale method {method!r}")
    return F.interpolate(samples, size=(height, width), mode=method)


def center_crop_to_aspect(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    old_h, old_w = samples.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return samples.narrow(-2, y, old_h - 2 * y).narrow(-1, x, old_w - 2 * x)


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pillow's LANCZOS resize of each image as 8-bit pixels: `clip(255 * x)` truncated to uint8 (computed in the
    tensor's own dtype, as ComfyUI's numpy code does), resized, then `/ 255` in float32 and cast back to the input's
    dtype and device. The 8-bit round trip is ComfyUI's, so values outside 0..1 are clipped.

    Three channels resize as an RGB image and four as RGBA, whose colour Pillow weights by alpha (premultiplied),
    exactly as ComfyUI gets it. Other channel counts (ComfyUI's Pillow call refuses them) resize channel by channel
    as greyscale images."""
    pixels = np.clip(255.0 * samples.detach().movedim(1, -1).cpu().numpy(), 0, 255).astype(np.uint8)
    resized = np.stack([_lanczos_image(image, width, height) for image in pixels])  # (B, height, width, C)
    out = torch.from_numpy(resized.astype(np.float32) / 255.0).movedim(-1, 1)
    return out.to(device=samples.device, dtype=samples.dtype)


def _lanczos_image(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    channels = pixels.shape[-1]
    if channels in _PIL_MODES:
        image = Image.fromarray(pixels, _PIL_MODES[channels])
        return np.asarray(image.resize((width, height), resample=Image.Resampling.LANCZOS))
    planes = [Image.fromarray(np.ascontiguousarray(pixels[..., c]), "L").resize((width, height),
                                                                                  resample=Image.Resampling.LANCZOS)
              for c in range(channels)]
    return np.stack([np.asarray(plane) for plane in planes], axis=-1)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Separable resize: along the width, then along the height, each output pixel a slerp of its two nearest
    source pixels (positions and ratios from a bilinear resize of the coordinates, as ComfyUI)."""
    dtype = samples.dtype
    x = _slerp_resize(samples.float(), width, dim=-1)
    x = _slerp_resize(x, height, dim=-2)
    return x.to(dtype)


def _slerp_resize(samples: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    moved = samples.movedim(dim, -1)  # (B, C, other, old)
    ratio, first, second = _neighbours(moved.shape[-1], size, samples.device)
    a = moved[..., first].movedim(1, -1)  # (B, other, new, C)
    b = moved[..., second].movedim(1, -1)
    out = _slerp(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]),
                 ratio.expand(a.shape[:-1]).reshape(-1, 1))
    return out.reshape(a.shape).movedim(-1, 1).movedim(-1, dim)


def _neighbours(old: int, new: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    coords = torch.arange(old, dtype=torch.float32, device=device).reshape(1, 1, 1, -1)
    scaled = F.interpolate(coords, size=(1, new), mode="bilinear").reshape(-1)
    ratio = scaled - scaled.floor()
    following = coords + 1
    following[..., -1] -= 1
    second = F.interpolate(following, size=(1, new), mode="bilinear").reshape(-1).to(torch.int64)
    return ratio, scaled.to(torch.int64), second


def _slerp(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of row vectors `a` -> `b` by ratios `r` (N, 1), norms interpolated linearly."""
    a_norm = a.norm(dim=-1, keepdim=True)
    b_norm = b.norm(dim=-1, keepdim=True)
    a_unit = torch.where(a_norm == 0, torch.zeros_like(a), a / a_norm)
    b_unit = torch.where(b_norm == 0, torch.zeros_like(b), b / b_norm)
    dot = (a_unit * b_unit).sum(-1)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    r1 = r.squeeze(1)
    result = (torch.sin((1.0 - r1) * omega) / so).unsqueeze(1) * a_unit + (torch.sin(r1 * omega) / so).unsqueeze(1) * b_unit
    result = result * (a_norm * (1.0 - r) + b_norm * r)
    parallel = dot > 1 - 1e-5
    opposite = dot < 1e-5 - 1
    result[parallel] = a[parallel]
    result[opposite] = (a * (1.0 - r) + b * r)[opposite]
    return result
