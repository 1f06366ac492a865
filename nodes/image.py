"""Model-free image nodes: loading input images and masks, solid images, inversion, batching."""
from __future__ import annotations

import hashlib

import torch

from engine import images
from engine.context import NodeContext
from engine.errors import EngineError
from engine.resize import common_upscale

MAX_RESOLUTION = 16384


class _InputImageNode:
    """Shared by the loaders of `input/` files: the file's hash is its change signal, and a missing file is a
    validation error (a 400) rather than a failure while running."""

    @classmethod
    def IS_CHANGED(cls, image: str, context: NodeContext):
        return hashlib.sha256(context.input_path(image).read_bytes()).hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, image: str, context: NodeContext):
        try:
            context.input_path(image)
        except EngineError as exc:
            return f"Invalid image file: {image} ({exc})"
        return True

    @staticmethod
    def image_input(context: NodeContext | None) -> tuple[list[str], dict]:
        return (context.folders.list_images() if context is not None else [], {"image_upload": True})


class LoadImage(_InputImageNode):
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    @classmethod
    def INPUT_TYPES(cls, context: NodeContext | None = None):
        return {"required": {"image": cls.image_input(context)}, "hidden": {"context": "CONTEXT"}}

    def load_image(self, image: str, context: NodeContext):
        return images.load_image(context.input_path(image))


class LoadImageMask(_InputImageNode):
    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "load_image"
    CHANNELS = ["alpha", "red", "green", "blue"]

    @classmethod
    def INPUT_TYPES(cls, context: NodeContext | None = None):
        return {
            "required": {"image": cls.image_input(context), "channel": (cls.CHANNELS,)},
            "hidden": {"context": "CONTEXT"},
        }

    def load_image(self, image: str, channel: str, context: NodeContext):
        return (images.load_channel(context.input_path(image), channel),)


class EmptyImage:
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
                "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
                "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}),
            }
        }

    def generate(self, width: int, height: int, batch_size: int = 1, color: int = 0):
        channels = [((color >> shift) & 0xFF) / 0xFF for shift in (16, 8, 0)]
        planes = [torch.full([batch_size, height, width, 1], value) for value in channels]
        return (torch.cat(planes, dim=-1),)


class ImageInvert:
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def invert(self, image: torch.Tensor):
        return (1.0 - image,)


class ImageBatch:
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "batch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image1": ("IMAGE",), "image2": ("IMAGE",)}}

    def batch(self, image1: torch.Tensor, image2: torch.Tensor):
        if image1.shape[-1] != image2.shape[-1]:  # RGB beside RGBA: the RGB batch gets an opaque alpha channel
            image1, image2 = (torch.nn.functional.pad(image, (0, 1), value=1.0) if image.shape[-1] == 3 else image
                              for image in (image1, image2))
        if image1.shape[1:] != image2.shape[1:]:
            # ComfyUI resizes the second batch to the first (bilinear, centre-cropped to its aspect ratio)
            resized = common_upscale(image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bilinear", "center")
            image2 = resized.movedim(1, -1)
        return (torch.cat((image1, image2), dim=0),)


NODE_CLASS_MAPPINGS = {
    "LoadImage": LoadImage,
    "LoadImageMask": LoadImageMask,
    "EmptyImage": EmptyImage,
    "ImageInvert": ImageInvert,
    "ImageBatch": ImageBatch,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadImage": "Load Image",
    "LoadImageMask": "Load Image (as Mask)",
    "EmptyImage": "EmptyImage",
    "ImageInvert": "Invert Image",
    "ImageBatch": "Batch Images",
}
