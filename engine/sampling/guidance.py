"""Classifier-free guidance as ComfyUI computes it: every cond evaluated on its area, accumulated with its weights,
each list averaged, then mixed by cfg.

Scope: ComfyUI's `calc_cond_batch` / `get_area_and_mult` / `cfg_function` / `create_cond_with_same_area_if_none`
(comfy/samplers.py) and the concatenation rules of `CONDCrossAttn` / `CONDNoiseShape` (comfy/conds.py), for
conditioning with areas, masks, strengths, timestep ranges and an inpainting concat (no ControlNet, GLiGEN or hooks).

Per model call, for every cond of the positive and the negative list:
- a cond whose timestep range does not hold the current sigma is skipped;
- its input is the noisy latent cropped to its area (the whole latent without one), together with its concat;
- its weight ("mult") is its mask (cropped, times the mask strength) or ones, times its strength; an area without a
  mask has its inner edges feathered over up to 8 latent pixels (linear ramp), so regions blend;
- conds that can share a batch (same cropped shape, same keys and shapes, cross-attention lengths within a 4x
  least-common-multiple padding) run as one model call, in ComfyUI's batch order (last listed first);
- each list accumulates `output * mult` and `mult` over its area; the list's prediction is their quotient (a
  pixel no cond covers predicts 0, thanks to ComfyUI's 1e-37 guard).
The result is `uncond + (cond - uncond) * cfg`; with cfg == 1 the negative list is not evaluated at all.

Before sampling, every cond with an area gets a partner with the same area in the other list (carrying the other
list's smallest enclosing cond's text conditioning), so guidance inside an area compares like with like.

References:
- Ho & Salimans 2022, "Classifier-Free Diffusion Guidance".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

# model_fn(x, sigma, cross_attn, y) or, with an inpainting concat, model_fn(x, sigma, cross_attn, y, concat=...)
ModelFn = Callable[..., Tensor]

_MAX_CROSS_ATTN_REPEAT = 4  # ComfyUI refuses to pad a cross-attention sequence more than 4x to batch it
_FEATHER = 8  # latent pixels over which an area's inner edges fade in


@dataclass(frozen=True, eq=False)  # identity equality: comparing tensors elementwise is never what is meant
class Cond:
    """One conditioning entry: what the denoiser is conditioned on, where, when, and how much it counts."""

    cross_attn: Tensor  # (1 | B, T, D) text-encoder hidden states
    y: Tensor | None = None  # (1 | B, adm) vector conditioning (SDXL's pooled text + size embedding)
    strength: float = 1.0  # weight of this entry where it applies
    area: tuple[int, int, int, int] | None = None  # (height, width, y, x) in latent pixels, ComfyUI's order
    mask: Tensor | None = None  # (1 | B, H, W) at the latent's size: per-pixel weight of this entry
    mask_strength: float = 1.0  # multiplies the mask
    timestep_range: tuple[float, float] | None = None  # (sigma_start, sigma_end): used while end <= sigma <= start
    concat: Tensor | None = None  # (1 | B, C, H, W) channels appended to the model input (inpainting models)

    def __post_init__(self) -> None:
        if self.area is not None:
            if len(self.area) != 4 or self.area[0] < 1 or self.area[1] < 1 or min(self.area[2:]) < 0:
                raise ValueError(f"Cond.area must be (height, width, y, x) with a positive size and a non-negative "
                                 f"offset in latent pixels, got {self.area}")
            object.__setattr__(self, "area", tuple(int(v) for v in self.area))
        if self.mask is not None and self.mask.ndim != 3:
            raise ValueError(f"Cond.mask must be (batch, height, width), got shape {tuple(self.mask.shape)}")
        if self.concat is not None and self.concat.ndim != 4:
            raise ValueError(f"Cond.concat must be (batch, channels, height, width), got {tuple(self.concat.shape)}")
        if self.timestep_range is not None and len(self.timestep_range) != 2:
            raise ValueError(f"Cond.timestep_range must be (sigma_start, sigma_end), got {self.timestep_range}")


@dataclass(frozen=True, eq=False)
class _Prepared:
    """A cond made ready for one model call: its cropped input and weight at the current step."""

    cond: Cond
    index: int  # which list (0 positive, 1 negative)
    x: Tensor  # (B, C, h, w) the noisy latent cropped to the area
    mult: Tensor  # (B, C, h, w) the weight of this cond's prediction
    area: tuple[int, int, int, int] | None  # clamped to the latent
    concat: Tensor | None  # (B, C', h, w) cropped and batched


def repeat_to_batch(tensor: Tensor, batch_size: int) -> Tensor:
    """Cut or tile along dim 0 to batch_size (ComfyUI's repeat_to_batch_size)."""
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    if tensor.shape[0] < batch_size:
        reps = [math.ceil(batch_size / tensor.shape[0])] + [1] * (tensor.ndim - 1)
        return tensor.repeat(reps)[:batch_size]
    return tensor


def _crop(tensor: Tensor, area: tuple[int, int, int, int] | None, first_spatial_dim: int) -> Tensor:
    if area is None:
        return tensor
    height, width, y, x = area
    return tensor.narrow(first_spatial_dim, y, height).narrow(first_spatial_dim + 1, x, width)


def _clamped_area(area: tuple[int, int, int, int] | None, x: Tensor) -> tuple[int, int, int, int] | None:
    """An area cut to end at the latent's edge (ComfyUI shrinks, never moves, an area that sticks out)."""
    if area is None:
        return None
    height, width, y, x_offset = area
    if y >= x.shape[2] or x_offset >= x.shape[3]:
        raise ValueError(f"conditioning area {area} (height, width, y, x in latent pixels) starts outside the "
                         f"{x.shape[2]}x{x.shape[3]} latent; move it inside the image")
    return (min(x.shape[2] - y, height), min(x.shape[3] - x_offset, width), y, x_offset)


def _feather(mult: Tensor, area: tuple[int, int, int, int], x: Tensor) -> None:
    """Fade the weight in over the area's inner edges (not along the latent's own border), in place."""
    height, width, y, x_offset = area
    for dim, offset, size, full in ((2, y, height, x.shape[2]), (3, x_offset, width, x.shape[3])):
        ramp = min(_FEATHER, mult.shape[dim] // 4)
        if offset != 0:
            for t in range(ramp):
                mult.narrow(dim, t, 1).mul_((1.0 / ramp) * (t + 1))
        if offset + size < full:
            for t in range(ramp):
                mult.narrow(dim, size - 1 - t, 1).mul_((1.0 / ramp) * (t + 1))


def _in_range(cond: Cond, sigma: float | None) -> bool:
    if cond.timestep_range is None:
        return True
    start, end = cond.timestep_range
    return not (sigma > start or sigma < end)


def _prepare(cond: Cond, index: int, x: Tensor, sigma: float | None) -> _Prepared | None:
    """ComfyUI's get_area_and_mult: None when the cond's timestep range excludes this step."""
    if not _in_range(cond, sigma):
        return None
    area = _clamped_area(cond.area, x)
    input_x = _crop(x, area, 2)
    if cond.mask is not None:
        if cond.mask.shape[1:] != x.shape[2:]:
            raise ValueError(f"a conditioning mask of size {tuple(cond.mask.shape[1:])} does not match the "
                             f"{tuple(x.shape[2:])} latent; resize it to the latent first")
        mask = _crop(cond.mask[: input_x.shape[0]], area, 1) * cond.mask_strength
        if input_x.shape[0] % mask.shape[0]:
            raise ValueError(f"a batch of {mask.shape[0]} conditioning masks does not divide the latent batch of "
                             f"{input_x.shape[0]}")
        mask = mask.unsqueeze(1).repeat(input_x.shape[0] // mask.shape[0], input_x.shape[1], 1, 1)
    else:
        mask = torch.ones_like(input_x)
    mult = mask * cond.strength
    if cond.mask is None and area is not None:
        _feather(mult, area, x)
    concat = None
    if cond.concat is not None:
        concat = repeat_to_batch(_crop(cond.concat.to(x.device), area, 2), x.shape[0])
    return _Prepared(cond, index, input_x, mult, area, concat)


def _can_batch(a: _Prepared, b: _Prepared) -> bool:
    """Whether two prepared conds can share one model call (ComfyUI's can_concat_cond without controls)."""
    if a.x.shape != b.x.shape:
        return False
    if (a.concat is None) != (b.concat is None) or (a.concat is not None and a.concat.shape != b.concat.shape):
        return False
    ya, yb = a.cond.y, b.cond.y
    if (ya is None) != (yb is None) or (ya is not None and ya.shape[1:] != yb.shape[1:]):
        return False
    s1, s2 = a.cond.cross_attn.shape, b.cond.cross_attn.shape
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


def _batches(entries: list[_Prepared]) -> list[list[_Prepared]]:
    """Group entries into model calls the way ComfyUI does: everything batchable with the first remaining entry,
    taken from the end of the list backwards."""
    remaining = list(entries)
    batches = []
    while remaining:
        first = remaining[0]
        picked = [i for i in range(len(remaining)) if _can_batch(remaining[i], first)]
        batches.append([remaining[i] for i in reversed(picked)])
        taken = set(picked)
        remaining = [e for i, e in enumerate(remaining) if i not in taken]
    return batches


def _call(model_fn: ModelFn, group: list[_Prepared], sigma: Tensor) -> tuple[Tensor, ...]:
    """One model call for a batch of prepared conds; the outputs, one chunk per cond."""
    batch = group[0].x.shape[0]
    device = group[0].x.device
    n = len(group)
    x = torch.cat([p.x for p in group])
    cross_attn = _concat_cross_attn([repeat_to_batch(p.cond.cross_attn, batch).to(device) for p in group])
    y = None
    if group[0].cond.y is not None:
        y = torch.cat([repeat_to_batch(p.cond.y, batch).to(device) for p in group])
    sigmas = torch.cat([sigma] * n)
    if group[0].concat is None:
        return model_fn(x, sigmas, cross_attn, y).chunk(n)
    return model_fn(x, sigmas, cross_attn, y, concat=torch.cat([p.concat for p in group])).chunk(n)


def _predict_lists(model_fn: ModelFn, conds: list[list[Cond] | None], x: Tensor, sigma: Tensor) -> list[Tensor | None]:
    """The weighted mean denoised output per cond list (None for a list that was not evaluated)."""
    # Timestep ranges compare the step's sigma on the host, as ComfyUI does; only then does a step wait for it.
    timed = any(c.timestep_range is not None for cond_list in conds if cond_list for c in cond_list)
    sigma_now = float(sigma[0]) if timed else None
    entries = []
    for k, cond_list in enumerate(conds):
        for cond in cond_list or ():
            prepared = _prepare(cond, k, x, sigma_now)
            if prepared is not None:
                entries.append(prepared)
    sums = [torch.zeros_like(x) for _ in conds]
    counts = [torch.ones_like(x) * 1e-37 for _ in conds]  # ComfyUI's guard: uncovered pixels predict 0
    for group in _batches(entries):
        for p, output in zip(group, _call(model_fn, group, sigma)):
            total = _crop(sums[p.index], p.area, 2)
            count = _crop(counts[p.index], p.area, 2)
            total += output * p.mult
            count += p.mult
    return [None if cond_list is None else sums[k] / counts[k] for k, cond_list in enumerate(conds)]


def _inside(inner: tuple[int, ...], outer: tuple[int, ...]) -> bool:
    """Whether area `inner` lies within area `outer` (both (height, width, y, x))."""
    return (inner[2] >= outer[2] and inner[3] >= outer[3]
            and inner[0] + inner[2] <= outer[0] + outer[2] and inner[1] + inner[3] <= outer[1] + outer[3])


def _add_opposite_area(target: list[Cond], cond: Cond) -> None:
    """ComfyUI's create_cond_with_same_area_if_none: give `target` an entry with `cond`'s area (and mask,
    strength, timestep range), conditioned like target's smallest entry enclosing that area."""
    if cond.area is None:
        return
    smallest = None
    for other in target:
        if other.area is None:
            if smallest is None:
                smallest = other
        elif _inside(cond.area, other.area):
            if smallest is None or smallest.area is None or \
                    math.prod(smallest.area[:2]) > math.prod(other.area[:2]):
                smallest = other
    if smallest is None or (smallest.area is not None and smallest.area == cond.area):
        return
    target.append(dataclasses.replace(cond, cross_attn=smallest.cross_attn, y=smallest.y, concat=smallest.concat))


def with_opposite_areas(positive: list[Cond], negative: list[Cond]) -> tuple[list[Cond], list[Cond]]:
    """Both lists, each extended so that every area of the other list has an entry of its own (new lists)."""
    lists = [list(positive), list(negative)]
    for k in range(2):
        for cond in lists[k]:  # the other list grows meanwhile; this one is complete
            _add_opposite_area(lists[1 - k], cond)
    return lists[0], lists[1]


def cfg_model(model_fn: ModelFn, positive: list[Cond], negative: list[Cond], cfg: float) -> Callable[..., Tensor]:
    """The guided denoiser `model(x, sigma, **extra) -> denoised` that samplers call.

    `model_fn(x (N, C, h, w), sigma (N,), cross_attn (N, T, D), y (N, adm) | None[, concat=(N, C', h, w)])
    -> denoised (N, C, h, w)` is the conditional denoiser; `concat` is passed only for conds that carry one.
    Extra keyword arguments from the sampler (the seed) are ignored.
    """
    positive, negative = with_opposite_areas(positive, negative)
    skip_uncond = math.isclose(cfg, 1.0)

    def guided(x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        cond, uncond = _predict_lists(model_fn, [positive, None if skip_uncond else negative], x, sigma)
        if uncond is None:
            return cond if cfg == 1.0 else cond * cfg
        return uncond + (cond - uncond) * cfg

    return guided
