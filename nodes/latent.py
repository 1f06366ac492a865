"""Latent nodes: empty latents, VAE decode/encode (plain and tiled), resizing and batch slicing."""
from __future__ import annotations

import math

import torch

from engine import autoencode
from engine.context import NodeContext
from engine.resize import common_upscale

MAX_RESOLUTION = 16384
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
CROP_METHODS = ["disabled", "center"]


class EmptyLatentImage:
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    DESCRIPTION = "Create a new batch of empty latent images to be denoised via sampling."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
        }}

    def generate(self, width: int, height: int, batch_size: int = 1):
        return ({"samples": torch.zeros([batch_size, 4, height // 8, width // 8])},)


class VAEDecode:
    CATEGORY = "latent"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}, "hidden": {"context": "CONTEXT"}}

    def decode(self, samples: dict, vae, context: NodeContext):
        with vae.active() as autoencoder:
            return (autoencode.decode(autoencoder, samples["samples"], check_interrupted=context.check_interrupted),)


class VAEDecodeTiled:
    CATEGORY = "_for_testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",), "vae": ("VAE",),
            "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 32}),
            "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32}),
            "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4}),
            "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4}),
        }, "hidden": {"context": "CONTEXT"}}

    def decode(self, samples: dict, vae, tile_size: int, overlap: int = 64, temporal_size: int = 64,
               temporal_overlap: int = 8, context: NodeContext | None = None):
        # temporal_* apply to video VAEs only; an image VAE has no time axis
        progress = context.report_progress if context is not None else None
        with vae.active() as autoencoder:
            return (autoencode.decode_tiled(autoencoder, samples["samples"], tile_size, overlap, progress=progress),)


class VAEEncode:
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    def encode(self, pixels: torch.Tensor, vae):
        with vae.active() as autoencoder:
            return ({"samples": autoencode.encode(autoencoder, pixels)},)


class VAEEncodeTiled:
    CATEGORY = "_for_testing"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE",), "vae": ("VAE",),
            "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64}),
            "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32}),
            "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4}),
            "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size: int, overlap: int = 64):
        # ComfyUI's tiled encode also runs passes with half-size tiles, which must still advance
        if tile_size // 2 <= overlap:
            return f"overlap ({overlap}) must be smaller than half the tile size ({tile_size // 2})"
        return True

    def encode(self, pixels: torch.Tensor, vae, tile_size: int, overlap: int = 64, temporal_size: int = 64,
               temporal_overlap: int = 8):
        with vae.active() as autoencoder:
            return ({"samples": autoencode.encode_tiled(autoencoder, pixels, tile_size, overlap)},)


class LatentUpscale:
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",), "upscale_method": (UPSCALE_METHODS,),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "crop": (CROP_METHODS,),
        }}

    def upscale(self, samples: dict, upscale_method: str, width: int, height: int, crop: str):
        latent = samples["samples"]
        if width == 0 and height == 0:
            return (dict(samples),)
        # a zero side follows the other's scale; every side at least 64 pixels, as ComfyUI
        if width == 0:
            height = max(64, height)
            width = max(64, round(latent.shape[-1] * height / latent.shape[-2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(latent.shape[-2] * width / latent.shape[-1]))
        else:
            width, height = max(64, width), max(64, height)
        return ({**samples, "samples": common_upscale(latent, width // 8, height // 8, upscale_method, crop)},)


class LatentUpscaleBy:
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",), "upscale_method": (UPSCALE_METHODS,),
            "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}),
        }}

    def upscale(self, samples: dict, upscale_method: str, scale_by: float):
        latent = samples["samples"]
        width, height = round(latent.shape[-1] * scale_by), round(latent.shape[-2] * scale_by)
        return ({**samples, "samples": common_upscale(latent, width, height, upscale_method, "disabled")},)


class LatentFromBatch:
    CATEGORY = "latent/batch"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "frombatch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "batch_index": ("INT", {"default": 0, "min": 0, "max": 63}),
            "length": ("INT", {"default": 1, "min": 1, "max": 64}),
        }}

    def frombatch(self, samples: dict, batch_index: int, length: int):
        latent = samples["samples"]
        batch_index = min(latent.shape[0] - 1, batch_index)
        length = min(latent.shape[0] - batch_index, length)
        out = dict(samples)
        out["samples"] = latent[batch_index:batch_index + length].clone()
        if "noise_mask" in samples:
            masks = samples["noise_mask"]
            if masks.shape[0] == 1:
                out["noise_mask"] = masks.clone()
            else:
                masks = _repeat_to(masks, latent.shape[0])
                out["noise_mask"] = masks[batch_index:batch_index + length].clone()
        if "batch_index" in samples:
            out["batch_index"] = samples["batch_index"][batch_index:batch_index + length]
        else:
            out["batch_index"] = list(range(batch_index, batch_index + length))
        return (out,)


class RepeatLatentBatch:
    CATEGORY = "latent/batch"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "repeat"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "amount": ("INT", {"default": 1, "min": 1, "max": 64})}}

    def repeat(self, samples: dict, amount: int):
        latent = samples["samples"]
        out = dict(samples)
        out["samples"] = latent.repeat((amount, 1, 1, 1))
        if "noise_mask" in samples and samples["noise_mask"].shape[0] > 1:
            out["noise_mask"] = samples["noise_mask"].repeat((amount, 1, 1, 1))  # as ComfyUI: not cycled first
        if "batch_index" in samples:
            indices = samples["batch_index"]
            offset = max(indices) - min(indices) + 1
            out["batch_index"] = indices + [x + i * offset for i in range(1, amount) for x in indices]
        return (out,)


def _repeat_to(masks: torch.Tensor, count: int) -> torch.Tensor:
    """Masks repeated to cover `count` latents (a shorter mask batch cycles), as ComfyUI does."""
    if masks.shape[0] < count:
        masks = masks.repeat(math.ceil(count / masks.shape[0]), 1, 1, 1)[:count]
    return masks


NODE_CLASS_MAPPINGS = {
    "EmptyLatentImage": EmptyLatentImage,
    "VAEDecode": VAEDecode,
    "VAEDecodeTiled": VAEDecodeTiled,
    "VAEEncode": VAEEncode,
    "VAEEncodeTiled": VAEEncodeTiled,
    "LatentUpscale": LatentUpscale,
    "LatentUpscaleBy": LatentUpscaleBy,
    "LatentFromBatch": LatentFromBatch,
    "RepeatLatentBatch": RepeatLatentBatch,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "EmptyLatentImage": "Empty Latent Image",
    "VAEDecode": "VAE Decode",
    "VAEDecodeTiled": "VAE Decode (Tiled)",
    "VAEEncode": "VAE Encode",
    "VAEEncodeTiled": "VAE Encode (Tiled)",
    "LatentUpscale": "Upscale Latent",
    "LatentUpscaleBy": "Upscale Latent By",
    "LatentFromBatch": "Latent From Batch",
    "RepeatLatentBatch": "Repeat Latent Batch",
}
