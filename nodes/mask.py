"""Mask nodes: conversions between IMAGE and MASK, solid masks, inversion, thresholds, growing, feathering,
cropping and compositing masks (ComfyUI's comfy_extras/nodes_mask.py), and the contract's BinarizeMask.

A MASK is `[B, H, W]` in 0..1. Like ComfyUI, nodes accept a single `[H, W]` mask as a batch of one where the
batch is reshaped first, and hand results on from where their inputs are (the CPU between nodes)."""
from __future__ import annotations

import numpy as np
import scipy.ndimage
import torch

MAX_RESOLUTION = 16384
IMAGE_CHANNELS = ["red", "green", "blue", "alpha"]
COMPOSITE_OPERATIONS = ["multiply", "add", "subtract", "and", "or", "xor"]


def as_batch(mask: torch.Tensor) -> torch.Tensor:
    """`[B, H, W]` from a mask of any leading shape, a `[H, W]` mask becoming a batch of one."""
    return mask.reshape(-1, mask.shape[-2], mask.shape[-1])


def _position(default: int = 0) -> tuple[str, dict]:
    return ("INT", {"default": default, "min": 0, "max": MAX_RESOLUTION, "step": 1})


def _size(default: int = 512) -> tuple[str, dict]:
    return ("INT", {"default": default, "min": 1, "max": MAX_RESOLUTION, "step": 1})


class ImageToMask:
    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "image_to_mask"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "channel": (IMAGE_CHANNELS,)}}

    def image_to_mask(self, image: torch.Tensor, channel: str):
        return (image[:, :, :, IMAGE_CHANNELS.index(channel)],)


class MaskToImage:
    CATEGORY = "mask"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "mask_to_image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",)}}

    def mask_to_image(self, mask: torch.Tensor):
        # a view of the mask repeated over three channels, not a copy, as ComfyUI hands it on
        return (as_batch(mask).unsqueeze(-1).expand(-1, -1, -1, 3),)


class InvertMask:
    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",)}}

    def invert(self, mask: torch.Tensor):
        return (1.0 - mask,)


class SolidMask:
    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "solid"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "value": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "width": _size(), "height": _size(),
        }}

    def solid(self, value: float, width: int, height: int):
        return (torch.full((1, height, width), value, dtype=torch.float32),)


class ThresholdMask:
    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "image_to_mask"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",),
                             "value": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01})}}

    def image_to_mask(self, mask: torch.Tensor, value: float):
        return ((mask > value).float(),)


class BinarizeMask:
    """The contract's threshold on the 8-bit scale: 1 where `mask >= threshold / 255`, else 0. The threshold is
    compared as a float32 value, as the node that defined BinarizeMask does."""
    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "binarize"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",),
                             "threshold": ("INT", {"default": 250, "min": 0, "max": 255, "step": 1})}}

    def binarize(self, mask: torch.Tensor, threshold: int):
        level = torch.tensor(threshold / 255.0, dtype=torch.float32, device=mask.device)
        return ((mask >= level).float(),)


class GrowMask:
    """Grey dilation (positive `expand`) or erosion (negative) by one pixel per step, with a 3x3 cross footprint
    (`tapered_corners`) or a full 3x3 square, mask by mask with scipy as ComfyUI does."""
    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "expand_mask"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mask": ("MASK",),
            "expand": ("INT", {"default": 0, "min": -MAX_RESOLUTION, "max": MAX_RESOLUTION, "step": 1}),
            "tapered_corners": ("BOOLEAN", {"default": True}),
        }}

    def expand_mask(self, mask: torch.Tensor, expand: int, tapered_corners: bool):
        corner = 0 if tapered_corners else 1
        footprint = np.array([[corner, 1, corner], [1, 1, 1], [corner, 1, corner]])
        step = scipy.ndimage.grey_erosion if expand < 0 else scipy.ndimage.grey_dilation
        grown = []
        for plane in as_batch(mask):
            values = plane.cpu().numpy()
            for _ in range(abs(expand)):
                values = step(values, footprint=footprint)
            grown.append(torch.from_numpy(values))
        return (torch.stack(grown).to(mask.device),)


class FeatherMask:
    """Linear ramps on the chosen edges: the k-th row or column from an edge (k = 1..n) is scaled by k / n; a
    corner gets the product of its two ramps."""
    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "feather"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",), "left": _position(), "top": _position(), "right": _position(),
                             "bottom": _position()}}

    def feather(self, mask: torch.Tensor, left: int, top: int, right: int, bottom: int):
        out = as_batch(mask).clone()
        height, width = out.shape[-2:]
        left, right, top, bottom = min(left, width), min(right, width), min(top, height), min(bottom, height)
        # the edges are applied one after the other, so where ramps overlap they multiply, as in ComfyUI
        for k in range(left):
            out[:, :, k] *= (k + 1) / left
        for k in range(right):
            out[:, :, -(k + 1)] *= (k + 1) / right
        for k in range(top):
            out[:, k, :] *= (k + 1) / top
        for k in range(bottom):
            out[:, -(k + 1), :] *= (k + 1) / bottom
        return (out,)


class CropMask:
    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "crop"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",), "x": _position(), "y": _position(), "width": _size(),
                             "height": _size()}}

    def crop(self, mask: torch.Tensor, x: int, y: int, width: int, height: int):
        return (as_batch(mask)[:, y:y + height, x:x + width],)


class MaskComposite:
    """`source` combined into `destination` with its top-left corner at (x, y), clipped to the destination; the
    logical operations treat values as booleans after rounding; the result is clamped to 0..1."""
    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"destination": ("MASK",), "source": ("MASK",), "x": _position(), "y": _position(),
                             "operation": (COMPOSITE_OPERATIONS,)}}

    def combine(self, destination: torch.Tensor, source: torch.Tensor, x: int, y: int, operation: str):
        out = as_batch(destination).clone()
        source = as_batch(source).to(out.device)
        bottom = min(y + source.shape[-2], out.shape[-2])
        right = min(x + source.shape[-1], out.shape[-1])
        if bottom <= y or right <= x:  # placed beyond the destination (ComfyUI fails on a shape mismatch here)
            return (out.clamp(0.0, 1.0),)
        src = source[:, :bottom - y, :right - x]
        dst = out[:, y:bottom, x:right]
        out[:, y:bottom, x:right] = _combine(dst, src, operation)
        return (out.clamp(0.0, 1.0),)


def _combine(dst: torch.Tensor, src: torch.Tensor, operation: str) -> torch.Tensor:
    if operation == "multiply":
        return dst * src
    if operation == "add":
        return dst + src
    if operation == "subtract":
        return dst - src
    logical = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}
    if operation not in logical:
        raise ValueError(f"unknown mask operation {operation!r}; one of {', '.join(COMPOSITE_OPERATIONS)}")
    return logical[operation](dst.round().bool(), src.round().bool()).float()


NODE_CLASS_MAPPINGS = {
    "ImageToMask": ImageToMask,
    "MaskToImage": MaskToImage,
    "InvertMask": InvertMask,
    "SolidMask": SolidMask,
    "ThresholdMask": ThresholdMask,
    "BinarizeMask": BinarizeMask,
    "GrowMask": GrowMask,
    "FeatherMask": FeatherMask,
    "CropMask": CropMask,
    "MaskComposite": MaskComposite,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ImageToMask": "Convert Image to Mask",
    "MaskToImage": "Convert Mask to Image",
}
