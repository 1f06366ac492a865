"""Pixels <-> latents with the SD VAE, as ComfyUI's VAEDecode / VAEEncode / VAEDecodeTiled / VAEEncodeTiled do it.

ComfyUI facts reproduced here (comfy/sd.py `VAE`, nodes.py):
- IMAGE is (B, H, W, C) float in 0..1; the VAE sees (B, C, H, W) in -1..1: `pixels * 2 - 1` on the way in (computed
  in the image's dtype, then cast to the VAE's dtype), `clamp((x + 1) / 2, 0, 1)` on the way out, after the VAE's
  output was cast to float32 on the output device.
- Results land on ComfyUI's "intermediate device", the CPU unless ComfyUI runs with --gpu-only: `output_device`.
- Encoding centre-crops H and W down to multiples of the downscale factor (offset `(size % 8) // 2`) and keeps the
  first three channels (alpha dropped).
- Plain decode/encode split the batch by a memory estimate (2178 * h * w * 64 bytes per element per latent pixel
  for decoding, 1767 per image pixel for encoding); on CUDA out-of-memory they fall back to the tiled path with
  ComfyUI's defaults (decode: 64x64 latent tiles, overlap 16; encode: 512x512 pixel tiles, overlap 64).
- VAEDecodeTiled takes `tile_size` and `overlap` in pixels, shrinks overlap to tile_size // 4 when it exceeds that,
  and divides both by the downscale factor; VAEEncodeTiled passes its pixel sizes through unchanged. Both average
  three tile grids (engine/tiling.py).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

from engine.models.vae import AutoencoderKL
from engine.tiling import decode_three_pass, encode_three_pass, three_pass_steps

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, float], None]
InterruptCheck = Callable[[], None]

CPU = torch.device("cpu")  # ComfyUI's intermediate device: decoded images and latents are handed on from the CPU

# ComfyUI's memory estimates for AutoencoderKL (bytes per element of the VAE dtype).
DECODE_BYTES_PER_LATENT_PIXEL = 2178 * 64
ENCODE_BYTES_PER_PIXEL = 1767

# Tile sizes ComfyUI falls back to after an out-of-memory error.
FALLBACK_DECODE_TILE, FALLBACK_DECODE_OVERLAP = 64, 16    # latent samples
FALLBACK_ENCODE_TILE, FALLBACK_ENCODE_OVERLAP = 512, 64   # pixels


def to_vae_input(image: Tensor) -> Tensor:
    """IMAGE (B, H, W, C) in 0..1 -> (B, C, H, W) in -1..1, in the image's dtype."""
    return image.movedim(-1, 1) * 2.0 - 1.0


def to_image(x: Tensor) -> Tensor:
    """VAE output (B, C, H, W), float32 -> IMAGE (B, H, W, C) clamped to 0..1."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)


def crop_for_encode(image: Tensor, factor: int) -> Tensor:
    """Centre-crop an IMAGE's height and width to multiples of `factor` and keep three channels, as ComfyUI."""
    if image.ndim != 4:
        raise ValueError(f"an IMAGE is (batch, height, width, channels); got shape {tuple(image.shape)}")
    if image.shape[-1] < 3:
        raise ValueError(f"the VAE encodes RGB images; this one has {image.shape[-1]} channel(s)")
    for dim in (1, 2):
        size = image.shape[dim]
        kept = size // factor * factor
        if kept == 0:
            raise ValueError(f"an image of {image.shape[1]}x{image.shape[2]} pixels is smaller than the VAE's "
                             f"{factor}-pixel cell")
        if kept != size:
            image = image.narrow(dim, (size % factor) // 2, kept)
    return image[..., :3]


def _free_memory(device: torch.device) -> float | None:
    """Bytes the VAE may use on a CUDA device (free plus what torch's cache holds unused); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _batch_size(device: torch.device, batch: int, bytes_needed: float) -> int:
    free = _free_memory(device)
    if free is None:
        return batch
    return max(1, int(free / max(1.0, bytes_needed)))


def _release_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ticker(total: int, progress: ProgressFn | None, check_interrupted: InterruptCheck | None) -> Callable[[], None]:
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)
        if check_interrupted is not None:
            check_interrupted()

    return tick


def _as_latent(latent: Tensor) -> Tensor:
    if latent.ndim == 5:  # a one-frame video latent, as ComfyUI accepts
        latent = latent[:, :, 0]
    if latent.ndim != 4:
        raise ValueError(f"a latent is (batch, channels, height, width); got shape {tuple(latent.shape)}")
    return latent


@torch.no_grad()
def decode(vae: AutoencoderKL, latent: Tensor, *, output_device: torch.device = CPU,
           check_interrupted: InterruptCheck | None = None, progress: ProgressFn | None = None) -> Tensor:
    """Latent (B, 4, h, w) -> IMAGE (B, h*8, w*8, 3) float32 in 0..1, on `output_device` (ComfyUI's VAEDecode).

    On a CUDA out-of-memory error falls back to ComfyUI's tiled decode; `progress` then reports its tiles.
    """
    latent = _as_latent(latent)
    try:
        pixels = _decode_batches(vae, latent, output_device, check_interrupted)
    except torch.OutOfMemoryError:
        log.warning("out of memory in a VAE decode of %s; retrying tiled", tuple(latent.shape))
        pixels = None  # leave the except block first so the failed attempt's tensors can be freed
    if pixels is None:
        _release_cache(vae.device)
        pixels = _decode_tiled_latent(vae, latent, FALLBACK_DECODE_TILE, FALLBACK_DECODE_TILE,
                                      FALLBACK_DECODE_OVERLAP, output_device, progress, check_interrupted)
    return to_image(pixels)


def _decode_batches(vae: AutoencoderKL, latent: Tensor, output_device: torch.device,
                    check_interrupted: InterruptCheck | None) -> Tensor:
    h, w = latent.shape[-2:]
    return _in_batches(vae, latent, DECODE_BYTES_PER_LATENT_PIXEL * h * w,
                       lambda z: vae.decode(z.to(device=vae.device, dtype=vae.dtype)), output_device,
                       check_interrupted)


def _in_batches(vae: AutoencoderKL, inputs: Tensor, bytes_per_item: int, run: Callable[[Tensor], Tensor],
                output_device: torch.device, check_interrupted: InterruptCheck | None) -> Tensor:
    """`run` over slices of the batch sized by ComfyUI's memory estimate (`bytes_per_item` per element byte),
    each result moved to `output_device` as float32, checking for an interrupt between slices."""
    step = _batch_size(vae.device, inputs.shape[0], bytes_per_item * (torch.finfo(vae.dtype).bits // 8))
    parts = []
    for start in range(0, inputs.shape[0], step):
        parts.append(run(inputs[start:start + step]).to(device=output_device, dtype=torch.float32))
        if check_interrupted is not None:
            check_interrupted()
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _decode_tiled_latent(vae: AutoencoderKL, latent: Tensor, tile_x: int, tile_y: int, overlap: int,
                         output_device: torch.device, progress: ProgressFn | None,
                         check_interrupted: InterruptCheck | None) -> Tensor:
    """ComfyUI's `VAE.decode_tiled_` (sizes in latent samples): (B, 3, H, W) float32 before pixel conversion."""
    B, _, h, w = latent.shape
    tick = _ticker(three_pass_steps(B, h, w, tile_x, tile_y, overlap), progress, check_interrupted)

    def decode_tile(z: Tensor) -> Tensor:
        return vae.decode(z.to(device=vae.device, dtype=vae.dtype)).float()

    return decode_three_pass(latent, decode_tile, tile_x, tile_y, overlap, vae.downscale_factor,
                             vae.config.out_channels, output_device, tick)


@torch.no_grad()
def decode_tiled(vae: AutoencoderKL, latent: Tensor, tile_size: int = 512, overlap: int = 64, *,
                 output_device: torch.device = CPU, progress: ProgressFn | None = None,
                 check_interrupted: InterruptCheck | None = None) -> Tensor:
    """ComfyUI's VAEDecodeTiled: `tile_size` and `overlap` in pixels; returns IMAGE (B, H, W, 3) float32 in 0..1."""
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    factor = vae.downscale_factor
    pixels = _decode_tiled_latent(vae, _as_latent(latent), tile_size // factor, tile_size // factor, overlap // factor,
                                  output_device, progress, check_interrupted)
    return to_image(pixels)


@torch.no_grad()
def encode(vae: AutoencoderKL, image: Tensor, *, output_device: torch.device = CPU,
           check_interrupted: InterruptCheck | None = None, progress: ProgressFn | None = None) -> Tensor:
    """IMAGE (B, H, W, C) in 0..1 -> latent (B, 4, H/8, W/8) float32 on `output_device` (ComfyUI's VAEEncode).

    Crops H and W to multiples of 8 about the centre and drops alpha. On a CUDA out-of-memory error falls back to
    ComfyUI's tiled encode; `progress` then reports its tiles.
    """
    pixels = crop_for_encode(image, vae.downscale_factor).movedim(-1, 1)  # (B, 3, H, W) in 0..1
    try:
        latent = _encode_batches(vae, pixels, output_device, check_interrupted)
    except torch.OutOfMemoryError:
        log.warning("out of memory in a VAE encode of %s; retrying tiled", tuple(pixels.shape))
        latent = None
    if latent is None:
        _release_cache(vae.device)
        latent = _encode_tiled_pixels(vae, pixels, FALLBACK_ENCODE_TILE, FALLBACK_ENCODE_TILE,
                                      FALLBACK_ENCODE_OVERLAP, output_device, progress, check_interrupted)
    return latent


def _encode_batches(vae: AutoencoderKL, pixels: Tensor, output_device: torch.device,
                    check_interrupted: InterruptCheck | None) -> Tensor:
    H, W = pixels.shape[-2:]
    return _in_batches(vae, pixels, ENCODE_BYTES_PER_PIXEL * H * W,
                       lambda x: vae.encode((x * 2.0 - 1.0).to(dtype=vae.dtype).to(device=vae.device)),
                       output_device, check_interrupted)


def _encode_tiled_pixels(vae: AutoencoderKL, pixels: Tensor, tile_x: int, tile_y: int, overlap: int,
                         output_device: torch.device, progress: ProgressFn | None,
                         check_interrupted: InterruptCheck | None) -> Tensor:
    """ComfyUI's `VAE.encode_tiled_` over (B, 3, H, W) pixels in 0..1, sizes in pixels."""
    B, _, H, W = pixels.shape
    tick = _ticker(three_pass_steps(B, H, W, tile_x, tile_y, overlap), progress, check_interrupted)

    def encode_tile(x: Tensor) -> Tensor:
        return vae.encode((x * 2.0 - 1.0).to(dtype=vae.dtype).to(device=vae.device)).float()

    return encode_three_pass(pixels, encode_tile, tile_x, tile_y, overlap, 1 / vae.downscale_factor,
                             vae.latent_channels, output_device, tick)


@torch.no_grad()
def encode_tiled(vae: AutoencoderKL, image: Tensor, tile_size: int = 512, overlap: int = 64, *,
                 output_device: torch.device = CPU, progress: ProgressFn | None = None,
                 check_interrupted: InterruptCheck | None = None) -> Tensor:
    """ComfyUI's VAEEncodeTiled: `tile_size` and `overlap` in pixels, used as given; returns the float32 latent."""
    pixels = crop_for_encode(image, vae.downscale_factor).movedim(-1, 1)
    return _encode_tiled_pixels(vae, pixels, tile_size, tile_size, overlap, output_device, progress,
                                check_interrupted)
