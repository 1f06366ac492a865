"""Latent arithmetic and geometry nodes (composite, blend, rotate, flip, crop, add, subtract, multiply,
interpolate, batch, seed behaviour) and latent files (SaveLatent / LoadLatent), as ComfyUI's nodes.py and
comfy_extras/nodes_latent.py / nodes_mask.py compute them.

A LATENT is `{"samples": (B, 4, H/8, W/8) raw latent, optional "noise_mask", "batch_index"}`; every node returns a
new dict carrying the input's other keys. Pixel inputs (x, y, width, height, feather) are divided by 8.

Latent files are safetensors with the tensor under "latent_tensor" and an empty "latent_format_version_0" marker;
a file without the marker is from ComfyUI's first format, which stored latents scaled by 0.18215.
"""
from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch
import torch

from engine.context import NodeContext
from engine.errors import BadRequest
from engine.resize import common_upscale
from engine.sampling.guidance import repeat_to_batch
from engine.savefiles import check_prefix, numbered_name, prompt_metadata, split_prefix, write_numbered

MAX_RESOLUTION = 16384
LATENT_EXTENSION = ".latent"
LEGACY_SCALE = 0.18215  # files without the version marker hold latents multiplied by SD1's scale factor


def _reshape_to(target: torch.Tensor, latent: torch.Tensor, repeat_batch: bool = True) -> torch.Tensor:
    """`latent` resized (bilinear, centre crop) to `target`'s channels-and-size and, optionally, batch-cycled to
    its batch (comfy_extras/nodes_latent.py `reshape_latent_to`)."""
    if latent.shape[1:] != target.shape[1:]:
        latent = common_upscale(latent, target.shape[-1], target.shape[-2], "bilinear", "center")
    return repeat_to_batch(latent, target.shape[0]) if repeat_batch else latent


class LatentComposite:
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "composite"

    @classmethod
    def INPUT_TYPES(cls):
        step8 = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}
        return {"required": {"samples_to": ("LATENT",), "samples_from": ("LATENT",), "x": ("INT", step8),
                             "y": ("INT", step8), "feather": ("INT", step8)}}

    def composite(self, samples_to, samples_from, x, y, feather=0):
        x, y, feather = x // 8, y // 8, feather // 8
        out = samples_to["samples"].clone()
        to = samples_to["samples"]
        source = samples_from["samples"][:, :, :to.shape[2] - y, :to.shape[3] - x]
        region = (slice(None), slice(None), slice(y, y + source.shape[2]), slice(x, x + source.shape[3]))
        if feather == 0:
            out[region] = source
        else:
            mask = torch.ones_like(source)
            for t in range(feather):
                # fade in over `feather` latent pixels along each side that lies inside the destination
                ramp = (1.0 / feather) * (t + 1)
                if y != 0:
                    mask[:, :, t:1 + t, :] *= ramp
                if y + source.shape[2] < to.shape[2]:
                    mask[:, :, mask.shape[2] - 1 - t:mask.shape[2] - t, :] *= ramp
                if x != 0:
                    mask[:, :, :, t:1 + t] *= ramp
                if x + source.shape[3] < to.shape[3]:
                    mask[:, :, :, mask.shape[3] - 1 - t:mask.shape[3] - t] *= ramp
            out[region] = source * mask + out[region] * (torch.ones_like(mask) - mask)
        return ({**samples_to, "samples": out},)


def composite_masked(destination: torch.Tensor, source: torch.Tensor, x: int, y: int,
                     mask: torch.Tensor | None = None, multiplier: int = 8,
                     resize_source: bool = False) -> torch.Tensor:
    """Paste `source` into `destination` (in place) at pixel offset (x, y), blended by `mask` (resized to the
    source), cut at the destination's edges (comfy_extras/nodes_mask.py `composite`)."""
    source = source.to(destination.device)
    if resize_source:
        source = torch.nn.functional.interpolate(source, size=(destination.shape[-2], destination.shape[-1]),
                                                 mode="bilinear")
    source = repeat_to_batch(source, destination.shape[0])
    x = max(-source.shape[-1] * multiplier, min(x, destination.shape[-1] * multiplier))
    y = max(-source.shape[-2] * multiplier, min(y, destination.shape[-2] * multiplier))
    left, top = x // multiplier, y // multiplier
    right, bottom = left + source.shape[-1], top + source.shape[-2]
    if mask is None:
        mask = torch.ones_like(source)
    else:
        mask = mask.to(destination.device, copy=True)
        mask = torch.nn.functional.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])),
                                               size=(source.shape[-2], source.shape[-1]), mode="bilinear")
        mask = repeat_to_batch(mask, source.shape[0])
    visible_width = destination.shape[-1] - left + min(0, x)
    visible_height = destination.shape[-2] - top + min(0, y)
    mask = mask[:, :, :visible_height, :visible_width]
    if mask.ndim < source.ndim:
        mask = mask.unsqueeze(1)
    source_part = mask * source[..., :visible_height, :visible_width]
    destination_part = (torch.ones_like(mask) - mask) * destination[..., top:bottom, left:right]
    destination[..., top:bottom, left:right] = source_part + destination_part
    return destination


class LatentCompositeMasked:
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "composite"

    @classmethod
    def INPUT_TYPES(cls):
        step8 = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}
        return {"required": {"destination": ("LATENT",), "source": ("LATENT",), "x": ("INT", step8),
                             "y": ("INT", step8), "resize_source": ("BOOLEAN", {"default": False})},
                "optional": {"mask": ("MASK",)}}

    def composite(self, destination, source, x, y, resize_source, mask=None):
        samples = composite_masked(destination["samples"].clone(), source["samples"], x, y, mask, 8, resize_source)
        return ({**destination, "samples": samples},)


class LatentBlend:
    CATEGORY = "_for_testing"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "blend"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",),
                             "blend_factor": ("FLOAT", {"default": 0.5, "min": 0, "max": 1, "step": 0.01})}}

    def blend(self, samples1, samples2, blend_factor):
        first, second = samples1["samples"], samples2["samples"]
        if first.shape != second.shape:
            second = common_upscale(second, first.shape[3], first.shape[2], "bicubic", "center")
        return ({**samples1, "samples": first * blend_factor + second * (1 - blend_factor)},)


class LatentRotate:
    CATEGORY = "latent/transform"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "rotate"
    ROTATIONS = ["none", "90 degrees", "180 degrees", "270 degrees"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "rotation": (cls.ROTATIONS,)}}

    def rotate(self, samples, rotation):
        turns = self.ROTATIONS.index(rotation)  # clockwise quarter turns
        return ({**samples, "samples": torch.rot90(samples["samples"], k=turns, dims=[3, 2])},)


class LatentFlip:
    CATEGORY = "latent/transform"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "flip"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",),
                             "flip_method": (["x-axis: vertically", "y-axis: horizontally"],)}}

    def flip(self, samples, flip_method):
        dim = 2 if flip_method.startswith("x") else 3
        return ({**samples, "samples": torch.flip(samples["samples"], dims=[dim])},)


class LatentCrop:
    CATEGORY = "latent/transform"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "crop"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 512, "min": 64, "max": MAX_RESOLUTION, "step": 8}
        offset = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}
        return {"required": {"samples": ("LATENT",), "width": ("INT", size), "height": ("INT", size),
                             "x": ("INT", offset), "y": ("INT", offset)}}

    def crop(self, samples, width, height, x, y):
        latent = samples["samples"]
        # the offset stays at least 8 latent pixels (64 pixels) inside the latent
        x = min(x // 8, latent.shape[3] - 8)
        y = min(y // 8, latent.shape[2] - 8)
        return ({**samples, "samples": latent[:, :, y:y + height // 8, x:x + width // 8]},)


class LatentAdd:
    CATEGORY = "latent/advanced"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",)}}

    def op(self, samples1, samples2):
        first = samples1["samples"]
        return ({**samples1, "samples": first + _reshape_to(first, samples2["samples"])},)


class LatentSubtract(LatentAdd):
    def op(self, samples1, samples2):
        first = samples1["samples"]
        return ({**samples1, "samples": first - _reshape_to(first, samples2["samples"])},)


class LatentMultiply:
    CATEGORY = "latent/advanced"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",),
                             "multiplier": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})}}

    def op(self, samples, multiplier):
        return ({**samples, "samples": samples["samples"] * multiplier},)


class LatentInterpolate:
    CATEGORY = "latent/advanced"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",),
                             "ratio": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}}

    def op(self, samples1, samples2, ratio):
        """Interpolate the per-pixel channel directions and, separately, their lengths (a norm-keeping lerp)."""
        first = samples1["samples"]
        second = _reshape_to(first, samples2["samples"])
        # (B, H, W) norms divide (B, C, H, W) latents by broadcasting from the right, exactly as ComfyUI's do
        # (per pixel for a batch of one)
        norm1 = torch.linalg.vector_norm(first, dim=(1))
        norm2 = torch.linalg.vector_norm(second, dim=(1))
        unit1 = torch.nan_to_num(first / norm1)
        unit2 = torch.nan_to_num(second / norm2)
        mixed = unit1 * ratio + unit2 * (1.0 - ratio)
        direction = torch.nan_to_num(mixed / torch.linalg.vector_norm(mixed, dim=(1)))
        return ({**samples1, "samples": direction * (norm1 * ratio + norm2 * (1.0 - ratio))},)


class LatentBatch:
    CATEGORY = "latent/batch"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "batch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",)}}

    def batch(self, samples1, samples2):
        first = samples1["samples"]
        second = _reshape_to(first, samples2["samples"], repeat_batch=False)
        indices = (samples1.get("batch_index", list(range(first.shape[0])))
                   + samples2.get("batch_index", list(range(second.shape[0]))))
        return ({**samples1, "samples": torch.cat((first, second), dim=0), "batch_index": indices},)


class LatentBatchSeedBehavior:
    CATEGORY = "latent/advanced"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",),
                             "seed_behavior": (["random", "fixed"], {"default": "fixed"})}}

    def op(self, samples, seed_behavior):
        out = dict(samples)
        if seed_behavior == "random":
            out.pop("batch_index", None)
        else:  # every item gets the first item's noise
            first = out.get("batch_index", [0])[0]
            out["batch_index"] = [first] * samples["samples"].shape[0]
        return (out,)


class SaveLatent:
    CATEGORY = "_for_testing"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "filename_prefix": ("STRING", {"default": "latents/ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "context": "CONTEXT"}}

    @classmethod
    def VALIDATE_INPUTS(cls, context: NodeContext, filename_prefix: str = "latents/ComfyUI"):
        return check_prefix(context.folders.output, filename_prefix)

    def save(self, samples, context: NodeContext, filename_prefix="latents/ComfyUI", prompt=None,
             extra_pnginfo=None):
        folder, subfolder, stem = split_prefix(context.folders.output, filename_prefix)
        data = latent_file_bytes(samples["samples"], prompt_metadata(prompt, extra_pnginfo))
        counter = write_numbered(folder, stem, context.file_numbers.take(folder, stem), LATENT_EXTENSION, data)
        context.file_numbers.written(folder, stem, counter)
        name = numbered_name(stem, counter, LATENT_EXTENSION)
        return {"ui": {"latents": [{"filename": name, "subfolder": subfolder, "type": "output"}]}}


class LoadLatent:
    CATEGORY = "_for_testing"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls, context: NodeContext | None = None):
        return {"required": {"latent": [latent_files(context.folders.input) if context is not None else []]},
                "hidden": {"context": "CONTEXT"}}

    @classmethod
    def IS_CHANGED(cls, latent: str, context: NodeContext):
        return context.input_digest(latent)

    @classmethod
    def VALIDATE_INPUTS(cls, latent: str, context: NodeContext):
        return context.check_input(latent, "latent")

    def load(self, latent: str, context: NodeContext):
        return (read_latent_file(context.input_path(latent)),)


def latent_files(folder: Path) -> list[str]:
    """The `.latent` files directly in `folder`, sorted (what LoadLatent offers)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(LATENT_EXTENSION) and (folder / n).is_file())


def latent_file_bytes(samples: torch.Tensor, metadata: dict[str, str] | None = None) -> bytes:
    """A latent file as ComfyUI's SaveLatent writes it."""
    tensors = {"latent_tensor": samples.detach().cpu().contiguous(), "latent_format_version_0": torch.tensor([])}
    return safetensors.torch.save(tensors, metadata=metadata)


def read_latent_file(path: Path) -> dict:
    """A LATENT from a latent file; files of the first format are scaled back by 1 / 0.18215."""
    try:
        tensors = safetensors.torch.load(path.read_bytes())
    except Exception as exc:  # safetensors raises several types for a damaged or foreign file
        raise BadRequest(f"{path.name} is not a latent file: {exc}") from exc
    if "latent_tensor" not in tensors:
        raise BadRequest(f"{path.name} holds no 'latent_tensor'; it is not a latent file written by SaveLatent")
    multiplier = 1.0 if "latent_format_version_0" in tensors else 1.0 / LEGACY_SCALE
    return {"samples": tensors["latent_tensor"].float() * multiplier}


NODE_CLASS_MAPPINGS = {
    "LatentComposite": LatentComposite,
    "LatentCompositeMasked": LatentCompositeMasked,
    "LatentBlend": LatentBlend,
    "LatentRotate": LatentRotate,
    "LatentFlip": LatentFlip,
    "LatentCrop": LatentCrop,
    "LatentAdd": LatentAdd,
    "LatentSubtract": LatentSubtract,
    "LatentMultiply": LatentMultiply,
    "LatentInterpolate": LatentInterpolate,
    "LatentBatch": LatentBatch,
    "LatentBatchSeedBehavior": LatentBatchSeedBehavior,
    "SaveLatent": SaveLatent,
    "LoadLatent": LoadLatent,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LatentComposite": "Latent Composite",
    "LatentBlend": "Latent Blend",
    "LatentRotate": "Rotate Latent",
    "LatentFlip": "Flip Latent",
    "LatentCrop": "Crop Latent",
}
