"""Inpainting and outpainting nodes: masked VAE encoding for any model (VAEEncodeForInpaint), a noise mask on a
latent (SetLatentNoiseMask), the extra inputs of inpainting checkpoints (InpaintModelConditioning), and padding an
image for outpainting (ImagePadForOutpaint).

Masks are 1 where the image is to be regenerated. The sampler honours a LATENT's "noise_mask" (see
engine/sampling/ksampler.py); inpainting checkpoints also see the mask and the masked image through their 5 extra
input channels (engine/inpaint.py)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from engine import autoencode

MAX_RESOLUTION = 16384
DOWNSCALE = 8  # pixels per latent pixel of SD's VAE


def encode(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels to a raw latent with a VAE handle, as VAEEncode does."""
    with vae.active() as autoencoder:
        return autoencode.encode(autoencoder, pixels)


def _pixel_mask_and_crop(pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask resized to the image (bilinear, (B, 1, H, W)), and both centre-cropped to multiples of 8 the way
    the VAE crops its input."""
    height, width = (pixels.shape[1] // DOWNSCALE) * DOWNSCALE, (pixels.shape[2] // DOWNSCALE) * DOWNSCALE
    mask = F.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])),
                         size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
    if pixels.shape[1] != height or pixels.shape[2] != width:
        y, x = (pixels.shape[1] % DOWNSCALE) // 2, (pixels.shape[2] % DOWNSCALE) // 2
        pixels = pixels[:, y:y + height, x:x + width, :]
        mask = mask[:, :, y:y + height, x:x + width]
    return pixels, mask


def _grey_out(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A copy of the image with its masked pixels (mask >= 0.5) set to mid-grey in the colour channels."""
    pixels = pixels.clone()
    keep = (1.0 - mask.round()).squeeze(1)  # (B, H, W)
    for channel in range(3):
        pixels[:, :, :, channel] -= 0.5
        pixels[:, :, :, channel] *= keep
        pixels[:, :, :, channel] += 0.5
    return pixels


class VAEEncodeForInpaint:
    CATEGORY = "latent/inpaint"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE",), "vae": ("VAE",), "mask": ("MASK",),
            "grow_mask_by": ("INT", {"default": 6, "min": 0, "max": 64, "step": 1}),
        }}

    def encode(self, vae, pixels, mask, grow_mask_by=6):
        pixels, mask = _pixel_mask_and_crop(pixels, mask)
        height, width = pixels.shape[1], pixels.shape[2]
        if grow_mask_by == 0:
            grown = mask
        else:
            # dilate by a box of grow_mask_by pixels, so the seam falls inside the regenerated region
            kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by))
            padding = math.ceil((grow_mask_by - 1) / 2)
            grown = torch.clamp(F.conv2d(mask.round(), kernel, padding=padding), 0, 1)
        samples = encode(vae, _grey_out(pixels, mask))
        return ({"samples": samples, "noise_mask": grown[:, :, :height, :width].round()},)


class SetLatentNoiseMask:
    CATEGORY = "latent/inpaint"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "set_mask"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    def set_mask(self, samples, mask):
        return ({**samples, "noise_mask": mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))},)


class InpaintModelConditioning:
    CATEGORY = "conditioning/inpaint"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "vae": ("VAE",), "pixels": ("IMAGE",),
            "mask": ("MASK",),
            "noise_mask": ("BOOLEAN", {"default": True, "tooltip": (
                "Add a noise mask to the latent so sampling will only happen within the mask. Might improve "
                "results or completely break things depending on the model.")}),
        }}

    def encode(self, positive, negative, pixels, vae, mask, noise_mask=True):
        cropped, mask = _pixel_mask_and_crop(pixels, mask)
        concat_latent = encode(vae, _grey_out(cropped, mask))
        latent = {"samples": encode(vae, pixels)}
        if noise_mask:
            latent["noise_mask"] = mask
        extra = {"concat_latent_image": concat_latent, "concat_mask": mask}
        out = [[[tensor, {**options, **extra}] for tensor, options in conditioning]
               for conditioning in (positive, negative)]
        return (out[0], out[1], latent)


class ImagePadForOutpaint:
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "expand_image"

    @classmethod
    def INPUT_TYPES(cls):
        side = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}
        return {"required": {
            "image": ("IMAGE",), "left": ("INT", side), "top": ("INT", side), "right": ("INT", side),
            "bottom": ("INT", side),
            "feathering": ("INT", {"default": 40, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
        }}

    def expand_image(self, image, left, top, right, bottom, feathering):
        batch, height, width, channels = image.size()
        padded = torch.ones((batch, height + top + bottom, width + left + right, channels), dtype=torch.float32) * 0.5
        padded[:, top:top + height, left:left + width, :] = image
        mask = torch.ones((height + top + bottom, width + left + right), dtype=torch.float32)
        mask[top:top + height, left:left + width] = _feathered_edges(height, width, left, top, right, bottom,
                                                                      feathering)
        return (padded, mask)


def _feathered_edges(height: int, width: int, left: int, top: int, right: int, bottom: int,
                     feathering: int) -> torch.Tensor:
    """The mask over the original image: 0 inside, rising as ((f - d) / f)^2 within f pixels of each padded side
    (d the distance to that side); all 0 when the image is too small for the feathering."""
    if not (feathering > 0 and feathering * 2 < height and feathering * 2 < width):
        return torch.zeros((height, width), dtype=torch.float32)
    rows = torch.arange(height, dtype=torch.int64).view(-1, 1)
    cols = torch.arange(width, dtype=torch.int64).view(1, -1)
    far_rows, far_cols = torch.full_like(rows, height), torch.full_like(cols, width)
    distance = torch.minimum(
        torch.minimum(rows if top else far_rows, height - rows if bottom else far_rows),
        torch.minimum(cols if left else far_cols, width - cols if right else far_cols))
    ramp = (feathering - distance).double() / feathering  # float64, as ComfyUI's per-pixel Python arithmetic
    return torch.where(distance < feathering, ramp * ramp, torch.zeros_like(ramp)).float()


NODE_CLASS_MAPPINGS = {
    "VAEEncodeForInpaint": VAEEncodeForInpaint,
    "SetLatentNoiseMask": SetLatentNoiseMask,
    "InpaintModelConditioning": InpaintModelConditioning,
    "ImagePadForOutpaint": ImagePadForOutpaint,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VAEEncodeForInpaint": "VAE Encode (for Inpainting)",
    "SetLatentNoiseMask": "Set Latent Noise Mask",
    "ImagePadForOutpaint": "Pad Image for Outpainting",
}
