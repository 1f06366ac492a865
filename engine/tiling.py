"""Tiled application of a resizing function (a VAE, an upscale model) to an image too large to process at once.

Reproduces ComfyUI's `comfy.utils.tiled_scale` (the 2-D case of `tiled_scale_multidim`) value for value: tiles start
every `tile - overlap` samples; each tile's output is weighted by a mask that ramps linearly from 1/feather to 1
over `feather = round(overlap * upscale_amount)` samples at all four edges (applied from both ends, so a tile
narrower than two ramps gets both factors), accumulated in float32 on the output device, and the sum is divided by
the sum of the masks. Input that fits in one tile is passed through `function` whole, with no mask.

Also ComfyUI's three-tiling passes of `VAE.decode_tiled_` / `encode_tiled_` (comfy/sd.py), which average the
tile grids (tile_x, tile_y), (tile_x / 2, tile_y * 2) and (tile_x * 2, tile_y / 2) so that seams of one grid fall
inside tiles of the others.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
from torch import Tensor

TileFn = Callable[[Tensor], Tensor]
Tick = Callable[[], None]


def tiled_scale_steps(width: int, height: int, tile_x: int, tile_y: int, overlap: int) -> int:
    """How many tiles `tiled_scale` runs for one image of this size (ComfyUI's `get_tiled_scale_steps`)."""
    rows = 1 if height <= tile_y else math.ceil((height - overlap) / (tile_y - overlap))
    cols = 1 if width <= tile_x else math.ceil((width - overlap) / (tile_x - overlap))
    return rows * cols


def _starts(size: int, tile: int, overlap: int) -> range | list[int]:
    if size <= tile:
        return [0]
    if tile <= overlap:
        raise ValueError(f"a tile of {tile} with an overlap of {overlap} never advances; use an overlap below the tile")
    return range(0, size - overlap, tile - overlap)


def _feather(length: int, feather: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The factors ComfyUI multiplies into one axis of a tile mask, as (first applied, second applied).

    ComfyUI multiplies position t and position length-1-t by (t+1)/feather for t in range(feather), in that order;
    near the middle of a short tile a position gets both ends' factors. Keeping the two factors apart and applying
    them in ComfyUI's order reproduces its float32 roundings exactly.
    """
    applied: list[list[float]] = [[] for _ in range(length)]
    if feather < length:
        for t in range(feather):
            a = (t + 1) / feather
            applied[t].append(a)
            applied[length - 1 - t].append(a)
    first = [f[0] if len(f) > 0 else 1.0 for f in applied]
    second = [f[1] if len(f) > 1 else 1.0 for f in applied]
    return (torch.tensor(first, dtype=torch.float32, device=device),
            torch.tensor(second, dtype=torch.float32, device=device))


def _tile_mask(height: int, width: int, feather: int, device: torch.device) -> Tensor:
    mask = torch.ones((1, 1, height, width), dtype=torch.float32, device=device)
    rows = _feather(height, feather, device)
    cols = _feather(width, feather, device)
    for factor in rows:
        mask.mul_(factor.view(1, 1, -1, 1))
    for factor in cols:
        mask.mul_(factor.view(1, 1, 1, -1))
    return mask


@torch.no_grad()
def tiled_scale(samples: Tensor, function: TileFn, tile_x: int, tile_y: int, overlap: int, upscale_amount: float,
                out_channels: int, output_device: torch.device | str, progress: Tick | None = None) -> Tensor:
    """Apply `function` to (B, C, H, W) `samples` tile by tile; returns float32 (B, out_channels, H*s, W*s).

    `tile_x`, `tile_y` and `overlap` are in input samples; `upscale_amount` s is the function's size ratio (8 for a
    VAE decode, 1/8 for an encode). `progress` is called once after each tile.
    """
    output_device = torch.device(output_device)
    B, _, H, W = samples.shape
    out_h, out_w = round(H * upscale_amount), round(W * upscale_amount)
    output = torch.empty((B, out_channels, out_h, out_w), dtype=torch.float32, device=output_device)
    feather = round(overlap * upscale_amount)
    for b in range(B):
        s = samples[b:b + 1]
        if H <= tile_y and W <= tile_x:
            output[b:b + 1] = function(s).to(output_device)
            if progress is not None:
                progress()
            continue
        out = output[b:b + 1].zero_()
        weight = torch.zeros((1, 1, out_h, out_w), dtype=torch.float32, device=output_device)
        for y, x in itertools.product(_starts(H, tile_y, overlap), _starts(W, tile_x, overlap)):
            tile = s[:, :, y:y + tile_y, x:x + tile_x]
            result = function(tile).to(output_device)
            mask = _tile_mask(result.shape[2], result.shape[3], feather, output_device)
            oy, ox = round(y * upscale_amount), round(x * upscale_amount)
            # a tile's output may overhang the image when sizes do not scale to whole samples
            th, tw = min(result.shape[2], out_h - oy), min(result.shape[3], out_w - ox)
            out[:, :, oy:oy + th, ox:ox + tw] += result[:, :, :th, :tw] * mask[:, :, :th, :tw]
            weight[:, :, oy:oy + th, ox:ox + tw] += mask[:, :, :th, :tw]
            if progress is not None:
                progress()
        out /= weight
    return output


def three_pass_steps(batch: int, height: int, width: int, tile_x: int, tile_y: int, overlap: int) -> int:
    """Tiles run by `decode_three_pass` / `encode_three_pass` over a batch, for progress totals."""
    grids = ((tile_x, tile_y), (tile_x // 2, tile_y * 2), (tile_x * 2, tile_y // 2))
    return batch * sum(tiled_scale_steps(width, height, tx, ty, overlap) for tx, ty in grids)


def decode_three_pass(samples: Tensor, function: TileFn, tile_x: int, tile_y: int, overlap: int, upscale_amount: float,
                      out_channels: int, output_device: torch.device | str, progress: Tick | None = None) -> Tensor:
    """ComfyUI's `VAE.decode_tiled_` tiling: the mean of three grids, summed in ComfyUI's order (float32)."""
    def run(tx: int, ty: int) -> Tensor:
        return tiled_scale(samples, function, tx, ty, overlap, upscale_amount, out_channels, output_device, progress)

    return (run(tile_x // 2, tile_y * 2) + run(tile_x * 2, tile_y // 2) + run(tile_x, tile_y)) / 3.0


def encode_three_pass(samples: Tensor, function: TileFn, tile_x: int, tile_y: int, overlap: int, upscale_amount: float,
                      out_channels: int, output_device: torch.device | str, progress: Tick | None = None) -> Tensor:
    """ComfyUI's `VAE.encode_tiled_` tiling: the same three grids as decoding, in another order."""
    def run(tx: int, ty: int) -> Tensor:
        return tiled_scale(samples, function, tx, ty, overlap, upscale_amount, out_channels, output_device, progress)

    result = run(tile_x, tile_y)
    result += run(tile_x * 2, tile_y // 2)
    result += run(tile_x // 2, tile_y * 2)
    result /= 3.0
    return result
