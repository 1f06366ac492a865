"""Image nodes: loading input images and masks, solid images, inversion, batching, resizing, cropping, blending,
filters, compositing and alpha (ComfyUI's nodes.py, comfy_extras/nodes_images.py, nodes_post_processing.py,
nodes_compositing.py and ImageCompositeMasked of nodes_mask.py), the contract's ImageCutout, and
ImageEstimateForegroundMask (U^2-Net background removal, engine/background.py).

IMAGE is `[B, H, W, C]` in 0..1 (C = 3, or 4 with alpha), MASK `[B, H, W]`; images are handed on from the CPU."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine import background, images
from engine.context import NodeContext
from engine.errors import EngineError
from engine.resize import common_upscale

MAX_RESOLUTION = 16384
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
CROP_METHODS = ["disabled", "center"]
BLEND_MODES = ["normal", "multiply", "screen", "overlay", "soft_light", "difference"]
DITHER_METHODS = ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"]


class _InputImageNode:
    """Shared by the loaders of `input/` files: the file's hash is its change signal, and a missing file is a
    validation error (a 400) rather than a failure while running."""

    @classmethod
    def IS_CHANGED(cls, image: str, context: NodeContext):
        return context.input_digest(image)

    @classmethod
    def VALIDATE_INPUTS(cls, image: str, context: NodeContext):
        return context.check_input(image)

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


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared by the nodes below


def repeat_to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """`tensor` cut or cycled along its first dimension to `batch` entries (comfy.utils.repeat_to_batch_size)."""
    if tensor.shape[0] > batch:
        return tensor[:batch]
    if tensor.shape[0] < batch:
        repeats = [math.ceil(batch / tensor.shape[0])] + [1] * (tensor.ndim - 1)
        return tensor.repeat(repeats)[:batch]
    return tensor


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """MASK `[B, H, W]` (or `[H, W]`) -> `[B, height, width]`, bilinear as JoinImageWithAlpha resizes alpha."""
    planes = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    return F.interpolate(planes, size=(height, width), mode="bilinear").squeeze(1)


def match_alpha(destination: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """node_helpers.image_alpha_fix: the source follows the destination's channels, dropping its alpha or gaining
    an opaque one."""
    if destination.shape[-1] < source.shape[-1]:
        source = source[..., :destination.shape[-1]]
    elif destination.shape[-1] > source.shape[-1]:
        source = F.pad(source, (0, 1), value=1.0)
    return destination, source


def composite(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None = None,
              multiplier: int = 8, resize_source: bool = False) -> torch.Tensor:
    """ComfyUI's `composite` (nodes_mask.py), channels first: `source` pasted into `destination` (changed in
    place and returned) with its top-left corner at (x, y) / multiplier, blended by `mask` (bilinearly resized to
    the source) where given; the parts outside the destination are dropped."""
    source = source.to(destination.device)
    if resize_source:
        source = F.interpolate(source, size=destination.shape[-2:], mode="bilinear")
    source = repeat_to_batch(source, destination.shape[0])
    src_h, src_w = source.shape[-2:]
    dst_h, dst_w = destination.shape[-2:]
    x = max(-src_w * multiplier, min(x, dst_w * multiplier))
    y = max(-src_h * multiplier, min(y, dst_h * multiplier))
    left, top = x // multiplier, y // multiplier
    right, bottom = left + src_w, top + src_h
    if mask is None:
        mask = torch.ones_like(source)
    else:
        mask = mask.to(destination.device, copy=True).reshape(-1, 1, mask.shape[-2], mask.shape[-1])
        mask = repeat_to_batch(F.interpolate(mask, size=(src_h, src_w), mode="bilinear"), source.shape[0])
    visible_w, visible_h = dst_w - left + min(0, x), dst_h - top + min(0, y)
    mask = mask[..., :visible_h, :visible_w]
    blended = mask * source[..., :visible_h, :visible_w] + (1 - mask) * destination[..., top:bottom, left:right]
    destination[..., top:bottom, left:right] = blended
    return destination


def gaussian_kernel(size: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """A normalised `size` x `size` Gaussian over the square [-1, 1]^2 (sigma in those units, as ComfyUI)."""
    axis = torch.linspace(-1, 1, size, device=device)
    x, y = torch.meshgrid(axis, axis, indexing="ij")
    d = torch.sqrt(x * x + y * y)
    g = torch.exp(-(d * d) / (2.0 * sigma * sigma))
    return (g / g.sum()).to(dtype)


def _filter(image: torch.Tensor, kernel: torch.Tensor, radius: int) -> torch.Tensor:
    """Depthwise convolution of an IMAGE by a (k, k) kernel over a reflect-padded border, as ComfyUI computes it:
    reflect-pad by the radius, convolve with zero padding, then cut the padding away."""
    channels = image.shape[-1]
    weight = kernel.repeat(channels, 1, 1).unsqueeze(1)  # (C, 1, k, k)
    x = F.pad(image.permute(0, 3, 1, 2), (radius,) * 4, "reflect")  # (B, C, H + 2r, W + 2r)
    x = F.conv2d(x, weight, padding=kernel.shape[-1] // 2, groups=channels)
    return x[:, :, radius:-radius, radius:-radius].permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------------------------
# Resizing, cropping, batches


class ImageScale:
    CATEGORY = "image/upscaling"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",), "upscale_method": (UPSCALE_METHODS,),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "crop": (CROP_METHODS,),
        }}

    def upscale(self, image: torch.Tensor, upscale_method: str, width: int, height: int, crop: str):
        if width == 0 and height == 0:
            return (image,)
        samples = image.movedim(-1, 1)
        # a zero side keeps the aspect ratio
        if width == 0:
            width = max(1, round(samples.shape[3] * height / samples.shape[2]))
        elif height == 0:
            height = max(1, round(samples.shape[2] * width / samples.shape[3]))
        return (common_upscale(samples, width, height, upscale_method, crop).movedim(1, -1),)


class ImageScaleBy:
    CATEGORY = "image/upscaling"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "upscale_method": (UPSCALE_METHODS,),
                             "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01})}}

    def upscale(self, image: torch.Tensor, upscale_method: str, scale_by: float):
        samples = image.movedim(-1, 1)
        width, height = round(samples.shape[3] * scale_by), round(samples.shape[2] * scale_by)
        return (common_upscale(samples, width, height, upscale_method, "disabled").movedim(1, -1),)


class ImageScaleToTotalPixels:
    """`resolution_steps` (newer ComfyUI: both sides rounded to a multiple of it) is optional here, so that
    prompts from ComfyUI versions without it keep validating; 1 is the old behaviour."""
    CATEGORY = "image/upscaling"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"image": ("IMAGE",), "upscale_method": (UPSCALE_METHODS,),
                         "megapixels": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 16.0, "step": 0.01})},
            "optional": {"resolution_steps": ("INT", {"default": 1, "min": 1, "max": 256})},
        }

    def upscale(self, image: torch.Tensor, upscale_method: str, megapixels: float, resolution_steps: int = 1):
        samples = image.movedim(-1, 1)
        scale = math.sqrt(megapixels * 1024 * 1024 / (samples.shape[3] * samples.shape[2]))
        width = round(samples.shape[3] * scale / resolution_steps) * resolution_steps
        height = round(samples.shape[2] * scale / resolution_steps) * resolution_steps
        return (common_upscale(samples, int(width), int(height), upscale_method, "disabled").movedim(1, -1),)


class ImageCrop:
    CATEGORY = "image/transform"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "crop"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}
        position = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}
        return {"required": {"image": ("IMAGE",), "width": ("INT", size), "height": ("INT", size),
                             "x": ("INT", position), "y": ("INT", position)}}

    def crop(self, image: torch.Tensor, width: int, height: int, x: int, y: int):
        # the corner stays inside the image, so the crop keeps at least one pixel
        x, y = min(x, image.shape[2] - 1), min(y, image.shape[1] - 1)
        return (image[:, y:y + height, x:x + width, :],)


class RepeatImageBatch:
    CATEGORY = "image/batch"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "repeat"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "amount": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    def repeat(self, image: torch.Tensor, amount: int):
        return (image.repeat((amount, 1, 1, 1)),)


class ImageFromBatch:
    CATEGORY = "image/batch"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "frombatch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",),
                             "batch_index": ("INT", {"default": 0, "min": 0, "max": 4095}),
                             "length": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    def frombatch(self, image: torch.Tensor, batch_index: int, length: int):
        batch_index = min(image.shape[0] - 1, batch_index)
        length = min(image.shape[0] - batch_index, length)
        return (image[batch_index:batch_index + length].clone(),)


# ---------------------------------------------------------------------------------------------------------------
# Blending and filters (comfy_extras/nodes_post_processing.py)


class ImageBlend:
    CATEGORY = "image/postprocessing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "blend_images"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image1": ("IMAGE",), "image2": ("IMAGE",),
                             "blend_factor": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
                             "blend_mode": (BLEND_MODES,)}}

    def blend_images(self, image1: torch.Tensor, image2: torch.Tensor, blend_factor: float, blend_mode: str):
        image1, image2 = match_alpha(image1, image2)
        image2 = image2.to(image1.device)
        if image1.shape != image2.shape:
            resized = common_upscale(image2.permute(0, 3, 1, 2), image1.shape[2], image1.shape[1], "bicubic",
                                     "center")
            image2 = resized.permute(0, 2, 3, 1)
        blended = image1 * (1 - blend_factor) + blend(image1, image2, blend_mode) * blend_factor
        blended = torch.clamp(blended, 0, 1)
        if image1.shape[-1] == 4:  # alpha is transparency, not colour: the first image's stays
            blended[..., 3] = image1[..., 3]
        return (blended,)


def blend(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """The blend modes of ImageBlend, `b` over `a` (soft light is the W3C formula)."""
    if mode == "normal":
        return b
    if mode == "multiply":
        return a * b
    if mode == "screen":
        return 1 - (1 - a) * (1 - b)
    if mode == "overlay":
        return torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b))
    if mode == "soft_light":
        d = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a))
        return torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (d - a))
    if mode == "difference":
        return a - b
    raise ValueError(f"unknown blend mode {mode!r}; one of {', '.join(BLEND_MODES)}")


class ImageBlur:
    """A Gaussian blur over a reflected border; computed on the executor's device, as ComfyUI computes it on its
    torch device, and handed on from the CPU."""
    CATEGORY = "image/postprocessing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "blur"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",),
                             "blur_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
                             "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1})},
                "hidden": {"context": "CONTEXT"}}

    def blur(self, image: torch.Tensor, blur_radius: int, sigma: float, context: NodeContext | None = None):
        if blur_radius == 0:
            return (image,)
        x = image.to(context.policy.device if context is not None else image.device)
        kernel = gaussian_kernel(2 * blur_radius + 1, sigma, device=x.device, dtype=x.dtype)
        return (_filter(x, kernel, blur_radius).to(image.device),)


class ImageSharpen:
    """Unsharp masking: the image minus `alpha * 10` times its Gaussian blur, renormalised so flat areas keep
    their value, over a reflected border; computed on the executor's device like ImageBlur."""
    CATEGORY = "image/postprocessing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "sharpen"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",),
                             "sharpen_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
                             "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.01}),
                             "alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.01})},
                "hidden": {"context": "CONTEXT"}}

    def sharpen(self, image: torch.Tensor, sharpen_radius: int, sigma: float, alpha: float,
                context: NodeContext | None = None):
        if sharpen_radius == 0:
            return (image,)
        x = image.to(context.policy.device if context is not None else image.device)
        kernel = gaussian_kernel(2 * sharpen_radius + 1, sigma, device=x.device, dtype=x.dtype) * -(alpha * 10)
        kernel = kernel.to(dtype=x.dtype)
        centre = sharpen_radius
        kernel[centre, centre] = kernel[centre, centre] - kernel.sum() + 1.0  # the weights sum to one
        return (torch.clamp(_filter(x, kernel, sharpen_radius), 0, 1).to(image.device),)


class ImageQuantize:
    """Pillow's palette quantisation (median cut to `colors`), image by image, dithered with Floyd-Steinberg or
    an ordered Bayer matrix; alpha passes through."""
    CATEGORY = "image/postprocessing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",),
                             "colors": ("INT", {"default": 256, "min": 1, "max": 256, "step": 1}),
                             "dither": (DITHER_METHODS,)}}

    def quantize(self, image: torch.Tensor, colors: int, dither: str):
        rgb = image[..., :3]
        result = torch.zeros_like(rgb)
        for index in range(rgb.shape[0]):
            pil = Image.fromarray((rgb[index] * 255).to(torch.uint8).cpu().numpy(), "RGB")
            palette = pil.quantize(colors=colors)  # quantising against a palette image: Pillow issue #5836
            if dither == "none":
                quantized = pil.quantize(palette=palette, dither=Image.Dither.NONE)
            elif dither == "floyd-steinberg":
                quantized = pil.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
            elif dither.startswith("bayer-"):
                quantized = _bayer_quantize(pil, palette, int(dither.split("-")[-1]))
            else:
                raise ValueError(f"unknown dither {dither!r}; one of {', '.join(DITHER_METHODS)}")
            result[index] = torch.tensor(np.array(quantized.convert("RGB"))).float() / 255
        if image.shape[-1] == 4:
            result = torch.cat((result, image[..., 3:]), dim=-1)
        return (result,)


def _bayer_matrix(level: int) -> np.ndarray:
    """The normalised Bayer threshold matrix of size 2**level, centred on zero (float32, as ComfyUI's numpy)."""
    if level == 0:
        return np.zeros((1, 1), "float32")
    q = 4 ** level
    m = q * _bayer_matrix(level - 1)
    return np.block([[m - 1.5, m + 0.5], [m + 1.5, m - 0.5]]) / q


def _bayer_quantize(pil: Image.Image, palette: Image.Image, order: int) -> Image.Image:
    """Ordered dithering: add the tiled Bayer offsets, scaled to the palette's spacing, then map undithered."""
    spread = 2 * 256 / (len(palette.getpalette()) // 3)
    offsets = torch.from_numpy(spread * _bayer_matrix(int(math.log2(order))) + 0.5)
    pixels = torch.from_numpy(np.array(pil).astype(np.float32))  # (H, W, 3)
    tiles_y = math.ceil(pixels.shape[0] / offsets.shape[0])
    tiles_x = math.ceil(pixels.shape[1] / offsets.shape[1])
    tiled = offsets.tile(tiles_y, tiles_x).unsqueeze(-1)
    pixels.add_(tiled[:pixels.shape[0], :pixels.shape[1]]).clamp_(0, 255)
    dithered = Image.fromarray(pixels.to(torch.uint8).numpy())
    return dithered.quantize(palette=palette, dither=Image.Dither.NONE)


# ---------------------------------------------------------------------------------------------------------------
# Compositing and alpha


class ImageCompositeMasked:
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "composite"

    @classmethod
    def INPUT_TYPES(cls):
        position = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}
        return {"required": {"destination": ("IMAGE",), "source": ("IMAGE",), "x": ("INT", position),
                             "y": ("INT", position), "resize_source": ("BOOLEAN", {"default": False})},
                "optional": {"mask": ("MASK",)}}

    def composite(self, destination: torch.Tensor, source: torch.Tensor, x: int, y: int, resize_source: bool,
                  mask: torch.Tensor | None = None):
        destination, source = match_alpha(destination, source)
        out = composite(destination.clone().movedim(-1, 1), source.movedim(-1, 1), x, y, mask, 1, resize_source)
        return (out.movedim(1, -1),)


class JoinImageWithAlpha:
    """RGB plus `1 - alpha` (a MASK marks what is transparent); batches are cycled to the longer one and the
    mask is resized bilinearly to the image."""
    CATEGORY = "mask/compositing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "join_image_with_alpha"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "alpha": ("MASK",)}}

    def join_image_with_alpha(self, image: torch.Tensor, alpha: torch.Tensor):
        alpha = alpha.reshape(-1, alpha.shape[-2], alpha.shape[-1])
        batch = max(len(image), len(alpha))
        image, alpha = repeat_to_batch(image, batch), repeat_to_batch(alpha, batch)
        alpha = 1.0 - resize_mask(alpha, image.shape[1], image.shape[2])
        return (torch.cat((image[..., :3], alpha.unsqueeze(-1)), dim=-1),)


class SplitImageWithAlpha:
    CATEGORY = "mask/compositing"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "split_image_with_alpha"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def split_image_with_alpha(self, image: torch.Tensor):
        rgb = image[..., :3]
        alpha = image[..., 3] if image.shape[-1] > 3 else torch.ones_like(image[..., 0])
        return (rgb, 1.0 - alpha)


class ImageCutout:
    """The contract's cutout: RGB plus the mask as alpha (1 = opaque, the foreground of
    ImageEstimateForegroundMask). A mask of another size is resized bilinearly to the image and batches are cycled
    to the longer one, as JoinImageWithAlpha does; an RGBA image's own alpha is replaced.

    The result is float64, as the node that defined ImageCutout builds it (a numpy array of zeros), so that the
    nodes after it compute in the same precision as there."""
    CATEGORY = "image/postprocessing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "cutout"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "mask": ("MASK",)}}

    def cutout(self, image: torch.Tensor, mask: torch.Tensor):
        mask = mask.reshape(-1, mask.shape[-2], mask.shape[-1]).to(image.device)
        batch = max(len(image), len(mask))
        image, mask = repeat_to_batch(image, batch), repeat_to_batch(mask, batch)
        if mask.shape[-2:] != image.shape[1:3]:
            mask = resize_mask(mask, image.shape[1], image.shape[2])
        return (torch.cat((image[..., :3].double(), mask.unsqueeze(-1).double()), dim=-1),)


class ImageEstimateForegroundMask:
    """A foreground mask from U^2-Net, as `rembg` computes it (engine/background.py): 1 for the salient object,
    0 for the background, in 8-bit steps. The weights are the `background_removal` model of the chosen name (a
    local `u2net.pth` / `u2netp.pth`, or the registry's hub file), kept in the executor's model cache."""
    CATEGORY = "image/postprocessing"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "estimate_background"
    MODELS = list(background.MODELS)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "model": (cls.MODELS, {"default": "u2net"})},
                "hidden": {"context": "CONTEXT"}}

    @classmethod
    def VALIDATE_INPUTS(cls, context: NodeContext, model: str | None = None):
        if model is None:  # linked from another node: judged when it runs
            return True
        if model not in cls.MODELS:
            return f"model must be one of {', '.join(cls.MODELS)}, got {model!r}"
        try:
            context.models.check(background.FOLDER, model)  # no download while validating
        except EngineError as exc:
            return str(exc)
        return True

    def estimate_background(self, image: torch.Tensor, model: str, context: NodeContext):
        path = context.models.find(background.FOLDER, model, progress=context.progress)
        with background.u2net_in_use(path, model, context.policy.device, context.resident) as net:
            return (background.estimate_foreground(net, image),)

NODE_CLASS_MAPPINGS = {
    "LoadImage": LoadImage,
    "LoadImageMask": LoadImageMask,
    "EmptyImage": EmptyImage,
    "ImageInvert": ImageInvert,
    "ImageBatch": ImageBatch,
    "ImageScale": ImageScale,
    "ImageScaleBy": ImageScaleBy,
    "ImageScaleToTotalPixels": ImageScaleToTotalPixels,
    "ImageCrop": ImageCrop,
    "RepeatImageBatch": RepeatImageBatch,
    "ImageFromBatch": ImageFromBatch,
    "ImageBlend": ImageBlend,
    "ImageBlur": ImageBlur,
    "ImageSharpen": ImageSharpen,
    "ImageQuantize": ImageQuantize,
    "ImageCompositeMasked": ImageCompositeMasked,
    "JoinImageWithAlpha": JoinImageWithAlpha,
    "SplitImageWithAlpha": SplitImageWithAlpha,
    "ImageCutout": ImageCutout,
    "ImageEstimateForegroundMask": ImageEstimateForegroundMask,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadImage": "Load Image",
    "LoadImageMask": "Load Image (as Mask)",
    "EmptyImage": "EmptyImage",
    "ImageInvert": "Invert Image",
    "ImageBatch": "Batch Images",
    "ImageScale": "Upscale Image",
    "ImageScaleBy": "Upscale Image By",
    "ImageScaleToTotalPixels": "Scale Image to Total Pixels",
    "ImageCrop": "Image Crop",
    "ImageBlend": "Image Blend",
    "ImageBlur": "Image Blur",
    "ImageSharpen": "Image Sharpen",
    "ImageQuantize": "Image Quantize",
    "JoinImageWithAlpha": "Join Image with Alpha",
    "SplitImageWithAlpha": "Split Image with Alpha",
    "ImageEstimateForegroundMask": "Estimate Foreground (rembg)",
}
