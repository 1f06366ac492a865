"""From CONDITIONING options to guidance fields: areas, masks, strengths, timestep ranges and the inpainting concat.

Scope: what ComfyUI does to a cond's options before sampling (comfy/samplers.py `resolve_areas_and_cond_masks_multidim`,
`get_mask_aabb`, `calculate_start_end_timesteps`) and the inpainting models' extra input channels
(comfy/model_base.py `BaseModel.concat_cond` with concat keys ("mask", "masked_image")), as one pure function,
`cond_options_to_fields`, whose result are keyword arguments of `engine.sampling.guidance.Cond`.

Option keys (ComfyUI's): "area" ((h, w, y, x) in latent pixels, or ("percentage", h, w, y, x) as fractions of the
latent), "strength", "mask" (a MASK, any size), "mask_strength", "set_area_to_bounds" (the area becomes the
mask's bounding box, at least 8x8), "start_percent" / "end_percent" (fractions of the way through sampling),
"concat_latent_image" (a raw latent) and "concat_mask" (a MASK) for inpainting models.

The inpainting concat is [mask (1 channel), masked-image latent (4 channels)] at the latent's size:
- mask: "concat_mask", else the LATENT's noise mask as the sampler resizes it, rounded to 0/1; without either,
  all ones over a blank image (the latent of a black picture), whatever "concat_latent_image" says;
- masked image: "concat_latent_image" scaled into model space, else the sampled latent itself (scaled unless all
  zeros), resized (bilinear, centre crop) and batch-resized to the latent when they differ.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from engine.resize import common_upscale
from engine.sampling.ksampler import prepare_mask
from engine.sampling.model_sampling import LatentFormat, ModelSampling

MIN_BOUNDS = 8  # a mask-bounds area is at least 8x8 latent pixels, as ComfyUI makes it
# The latent of an all-black image under SD's VAE, per channel (ComfyUI's blank_inpaint_image_like).
BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


def cond_options_to_fields(
    options: Mapping[str, Any],
    latent: Tensor,
    model_sampling: ModelSampling,
    *,
    latent_format: LatentFormat | None = None,
    noise_mask: Tensor | None = None,
    inpaint_model: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `Cond` (area, strength, mask, mask_strength, timestep_range, concat) for one
    CONDITIONING entry's options, sampling `latent` (raw, (B, C, H, W)).

    `noise_mask` is the sampled LATENT's "noise_mask", `inpaint_model` whether the model takes the 5 concat
    channels (then `latent_format` is required); tensors land on `device` (default: the latent's).
    """
    device = latent.device if device is None else torch.device(device)
    height, width = latent.shape[-2:]
    fields: dict[str, Any] = {}
    if options.get("area") is not None:
        fields["area"] = resolve_area(options["area"], height, width)
    if "strength" in options:
        fields["strength"] = float(options["strength"])
    if options.get("mask") is not None:
        mask = resize_cond_mask(options["mask"].to(device), height, width)
        if options.get("set_area_to_bounds", False):
            fields["area"] = mask_bounds(mask)
        fields["mask"] = mask
        fields["mask_strength"] = float(options.get("mask_strength", 1.0))
    timestep_range = sigma_range(options, model_sampling)
    if timestep_range is not None:
        fields["timestep_range"] = timestep_range
    if inpaint_model:
        if latent_format is None:
            raise ValueError("an inpainting model's concat needs the model's latent format")
        fields["concat"] = inpaint_concat(options, latent, latent_format, noise_mask, device)
    return fields


def resolve_area(area: tuple, height: int, width: int) -> tuple[int, int, int, int]:
    """(h, w, y, x) in latent pixels; a ("percentage", h, w, y, x) area scaled to the latent (size at least 1)."""
    if area[0] == "percentage":
        h, w, y, x = area[1:5]
        return (max(1, round(h * height)), max(1, round(w * width)), round(y * height), round(x * width))
    return tuple(int(v) for v in area[:4])


def resize_cond_mask(mask: Tensor, height: int, width: int) -> Tensor:
    """A conditioning mask as (B, H, W) at the latent's size (bilinear when it differs)."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape[1:]) != (height, width):
        mask = common_upscale(mask.unsqueeze(1), width, height, "bilinear", "disabled").squeeze(1)
    return mask


def mask_bounds(mask: Tensor) -> tuple[int, int, int, int]:
    """The area (h, w, y, x) bounding every non-zero pixel of any mask in the batch, at least 8x8 (ComfyUI's
    `set_area_to_bounds`); an all-zero mask gives the minimal (8, 8, 0, 0)."""
    bounds = mask.abs().amax(dim=0)
    ys, xs = torch.nonzero(bounds, as_tuple=True)
    if ys.numel() == 0:
        return (MIN_BOUNDS, MIN_BOUNDS, 0, 0)
    top, left, bottom, right = int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())
    return (max(MIN_BOUNDS, bottom - top + 1), max(MIN_BOUNDS, right - left + 1), top, left)


def sigma_range(options: Mapping[str, Any], model_sampling: ModelSampling) -> tuple[float, float] | None:
    """(sigma_start, sigma_end) of "start_percent" / "end_percent" (a missing end never excludes a step)."""
    if "start_percent" not in options and "end_percent" not in options:
        return None
    start = model_sampling.percent_to_sigma(options["start_percent"]) if "start_percent" in options else math.inf
    end = model_sampling.percent_to_sigma(options["end_percent"]) if "end_percent" in options else -math.inf
    return (start, end)


def resize_to_batch(tensor: Tensor, batch_size: int) -> Tensor:
    """ComfyUI's resize_to_batch_size: pick evenly spread items (not cycle) to reach `batch_size`."""
    count = tensor.shape[0]
    if count == batch_size:
        return tensor
    if batch_size <= 1:
        return tensor[:batch_size]
    if batch_size < count:
        scale = (count - 1) / (batch_size - 1)
        picks = [min(round(i * scale), count - 1) for i in range(batch_size)]
    else:
        scale = count / batch_size
        picks = [min(math.floor((i + 0.5) * scale), count - 1) for i in range(batch_size)]
    return tensor[picks]


def blank_inpaint_latent(like: Tensor) -> Tensor:
    """Model-space latent of a black image, shaped like `like` (B, 4, H, W)."""
    scale = torch.tensor(BLANK_INPAINT_LATENT, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    return torch.ones_like(like) * scale


def inpaint_concat(options: Mapping[str, Any], latent: Tensor, latent_format: LatentFormat,
                   noise_mask: Tensor | None, device: torch.device) -> Tensor:
    """The 5 channels an inpainting UNet takes besides the noisy latent: (B, 1 + 4, H, W) on `device`."""
    shape = latent.shape
    batch, height, width = shape[0], shape[-2], shape[-1]
    sampled = latent.to(device=device, dtype=torch.float32)
    if torch.count_nonzero(sampled) > 0:
        sampled = latent_format.process_in(sampled)
    mask = options.get("concat_mask")
    if mask is None and noise_mask is not None:
        mask = prepare_mask(noise_mask, shape, device).float()
    if mask is None:
        return torch.cat([torch.ones_like(sampled)[:, :1], blank_inpaint_latent(sampled)], dim=1)
    image = options.get("concat_latent_image")
    image = sampled if image is None else latent_format.process_in(image)
    if image.shape[1:] != shape[1:]:
        image = common_upscale(image, width, height, "bilinear", "center")
    image = resize_to_batch(image, batch)
    if mask.ndim == len(shape):
        mask = mask[:, :1]
    mask = mask.reshape((-1, 1) + tuple(mask.shape[-2:]))
    if tuple(mask.shape[-2:]) != (height, width):
        mask = common_upscale(mask, width, height, "bilinear", "center")
    mask = resize_to_batch(mask.round(), batch)
    return torch.cat([mask.to(device), image.to(device)], dim=1)
