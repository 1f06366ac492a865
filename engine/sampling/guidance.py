"""Classifier-free guidance as ComfyUI computes it: conds batched with the uncond, averaged, then mixed by cfg.

Scope: ComfyUI's `sampling_function` / `calc_cond_batch` / `cfg_function` (comfy/samplers.py) and the cross-
attention concatenation rule of `CONDCrossAttn` (comfy/conds.py) for conditioning without areas, masks or timestep
ranges. Every cond of the positive and the negative list is evaluated; conds that can share a batch (same keys and
shapes, cross-attention lengths within a 4x least-common-multiple padding) run as one model call, in ComfyUI's
batch order (last listed first); each list's outputs are averaged with their strengths as weights; the result is
`uncond + (cond - uncond) * cfg`. With cfg == 1 the negative list is not evaluated at all.

References:
- Ho & Salimans 2022, "Classifier-Free Diffusion Guidance".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]

_POSITIVE, _NEGATIVE = 0, 1
_MAX_CROSS_ATTN_REPEAT = 4  # ComfyUI refuses to pad a cross-attention sequence more than 4x to batch it


@dataclass(frozen=True, eq=False)  # identity equality: comparing tensors elementwise is never what is meant
class Cond:
    """One conditioning entry: what the denoiser is conditioned on, and how much it counts."""

    cross_attn: Tensor  # (1 | B, T, D) text-encoder hidden states
    y: Tensor | None = None  # (1 | B, adm) vector conditioning (SDXL's pooled text + size embedding)
    strength: float = 1.0  # weight of this entry when its list is averaged
    # Reserved for regional and scheduled prompting; not supported yet, so any value is refused.
    area: tuple[int, ...] | None = None
    mask: Tensor | None = None
    timestep_range: tuple[float, float] | None = None  # (start_percent, end_percent)

    def __post_init__(self) -> None:
        for name in ("area", "mask", "timestep_range"):
            if getattr(self, name) is not None:
                raise NotImplementedError(f"Cond.{name} is not supported yet; send conditioning without it")


def _repeat_to_batch(tensor: Tensor, batch_size: int) -> Tensor:
    """Cut or tile along dim 0 to batch_size (ComfyUI's repeat_to_batch_size)."""
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    if tensor.shape[0] < batch_size:
        reps = [math.ceil(batch_size / tensor.shape[0])] + [1] * (tensor.ndim - 1)
        return tensor.repeat(reps)[:batch_size]
    return tensor


def _can_batch(a: Cond, b: Cond) -> bool:
    """Whether two conds can share one model call (ComfyUI's can_concat_cond without areas or controls)."""
    if (a.y is None) != (b.y is None):
        return False
    if a.y is not None and a.y.shape[1:] != b.y.shape[1:]:
        return False
    s1, s2 = a.cross_attn.shape, b.cross_attn.shape
    if s1[2] != s2[2]:
        return False
    return math.lcm(s1[1], s2[1]) // min(s1[1], s2[1]) <= _MAX_CROSS_ATTN_REPEAT


def _concat_cross_attn(tensors: list[Tensor]) -> Tensor:
    """Concatenate along the batch after tiling each sequence to the least common multiple of the lengths;
    attention over a sequence repeated k times equals attention over the sequence (the softmax weights split)."""
    length = 1
    for t in tensors:
        length = math.lcm(length, t.shape[1])
    return torch.cat([t.repeat(1, length // t.shape[1], 1) if t.shape[1] < length else t for t in tensors])


def _batches(entries: list[tuple[Cond, int]]) -> list[list[tuple[Cond, int]]]:
    """Group entries into model calls the way ComfyUI does: everything batchable with the first remaining entry,
    taken from the end of the list backwards."""
    remaining = list(entries)
    batches = []
    while remaining:
        first = remaining[0][0]
        picked = [i for i in range(len(remaining)) if _can_batch(remaining[i][0], first)]
        batches.append([remaining[i] for i in reversed(picked)])
        taken = set(picked)
        remaining = [e for i, e in enumerate(remaining) if i not in taken]
    return batches


def _predict_lists(model_fn: ModelFn, conds: list[list[Cond] | None], x: Tensor, sigma: Tensor) -> list[Tensor | None]:
    """The strength-weighted mean denoised output per cond list (None for a list that was not evaluated)."""
    entries = [(c, k) for k, cond_list in enumerate(conds) if cond_list is not None for c in cond_list]
    sums: list[Tensor | None] = [None] * len(conds)
    # Counts start at ComfyUI's 1e-37 guard and live on x's device, so the final division is the same elementwise
    # division ComfyUI performs (a CUDA division by a CPU scalar would multiply by its reciprocal instead).
    counts = [x.new_full((), 1e-37) for _ in conds]
    batch = x.shape[0]
    for group in _batches(entries):
        cross_attn = _concat_cross_attn([_repeat_to_batch(c.cross_attn, batch).to(x.device) for c, _ in group])
        y = None if group[0][0].y is None else torch.cat([_repeat_to_batch(c.y, batch).to(x.device) for c, _ in group])
        n = len(group)
        out = model_fn(torch.cat([x] * n), torch.cat([sigma] * n), cross_attn, y).chunk(n)
        for (cond, k), denoised in zip(group, out):
            weighted = denoised if cond.strength == 1.0 else denoised * cond.strength
            sums[k] = weighted if sums[k] is None else sums[k] + weighted
            counts[k] = counts[k] + cond.strength
    return [None if s is None else s / counts[k] for k, s in enumerate(sums)]


def cfg_model(model_fn: ModelFn, positive: list[Cond], negative: list[Cond], cfg: float) -> Callable[..., Tensor]:
    """The guided denoiser `model(x, sigma, **extra) -> denoised` that samplers call.

    `model_fn(x (N, C, H, W), sigma (N,), cross_attn (N, T, D), y (N, adm) | None) -> denoised (N, C, H, W)` is
    the conditional denoiser; extra keyword arguments from the sampler (the seed) are ignored.
    """
    skip_uncond = math.isclose(cfg, 1.0)

    def guided(x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        cond, uncond = _predict_lists(model_fn, [positive, None if skip_uncond else negative], x, sigma)
        # A list that produced nothing counts as zeros, as ComfyUI's zero-initialised accumulator does.
        if cond is None:
            cond = torch.zeros_like(x)
        if uncond is None:
            return cond if cfg == 1.0 else cond * cfg
        return uncond + (cond - uncond) * cfg

    return guided
