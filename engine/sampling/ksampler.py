"""The KSampler algorithm: seeded noise, the sigma schedule, noising, guided sampling, and latent scaling.

Scope: ComfyUI's comfy/sample.py (`prepare_noise`, `sample`, `sample_custom`) and the KSampler / CFGGuider /
KSAMPLER / KSamplerX0Inpaint classes of comfy/samplers.py: raw latent in, raw latent out, with an optional noise
mask (inpainting with any model). The KSampler and KSamplerAdvanced nodes map onto `sample` (KSamplerAdvanced:
`add_noise`, `start_step`, `last_step`, `force_full_denoise = return_with_leftover_noise == "disable"`);
SamplerCustom and SamplerCustomAdvanced map onto `sample_custom`.

Order of operations, as ComfyUI: noise is drawn on the CPU from the seed; the schedule is computed on the CPU (with
`denoise < 1` taking the tail of a longer schedule); a noise mask is resized to the latent (bilinear, where the
mask lives) and moved to the latent's device; the latent is scaled into model space unless it is all zeros; the
noise is scaled to the first sigma and added; the sampler runs on the latent's device with `{"seed": seed}` as
extra arguments; the result is scaled back out of model space.

With a noise mask (1 = regenerate, 0 = keep), every model call sees the kept region replaced by the original
latent noised to the current sigma, and its prediction there replaced by the original latent, so the sampler
pulls the kept region back to the input. The noise used for that is the sampling noise, except for "ddim", which
(as in ComfyUI) draws separate noise from the seed + 1.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.sampling.guidance import Cond, ModelFn, cfg_model, repeat_to_batch
from engine.sampling.model_sampling import LatentFormat, ModelSampling, is_max_denoise
from engine.sampling.samplers import DISCARD_PENULTIMATE_SIGMA_SAMPLERS, Callback, get_sampler
from engine.sampling.schedules import scheduler_sigmas


def prepare_noise(latent: Tensor, seed: int, batch_index: Sequence[int] | None = None) -> Tensor:
    """Gaussian noise like `latent` from a CPU generator seeded with `seed` (torch.manual_seed's stream).

    With `batch_index` (a latent batch cut from a larger one), item k gets the noise that item batch_index[k] of
    the full batch would get: per-item draws are made in order up to the largest index and the rest discarded.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if batch_index is None:
        return torch.randn(latent.size(), dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu")
    wanted = sorted(set(batch_index))
    item_shape = [1] + list(latent.size())[1:]
    drawn = {}
    for i in range(wanted[-1] + 1):
        noise = torch.randn(item_shape, dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu")
        if i in wanted:
            drawn[i] = noise
    return torch.cat([drawn[i] for i in batch_index], dim=0)


def _schedule(model_sampling: ModelSampling, scheduler: str, steps: int, sampler_name: str) -> Tensor:
    """The scheduler's sigmas; samplers that waste their penultimate step ask for one more and drop it."""
    if sampler_name not in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        return scheduler_sigmas(model_sampling, scheduler, steps)
    sigmas = scheduler_sigmas(model_sampling, scheduler, steps + 1)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def calculate_sigmas(
    model_sampling: ModelSampling, scheduler: str, steps: int, sampler_name: str, denoise: float | None = 1.0
) -> Tensor:
    """KSampler's schedule: with denoise < 1, the last steps + 1 sigmas of a schedule of int(steps / denoise)
    steps (so img2img starts part-way down the full schedule); no sigmas at all for denoise <= 0."""
    if denoise is None or denoise > 0.9999:
        return _schedule(model_sampling, scheduler, steps, sampler_name)
    if denoise <= 0.0:
        return torch.zeros(0, dtype=torch.float32)
    return _schedule(model_sampling, scheduler, int(steps / denoise), sampler_name)[-(steps + 1):]


def slice_sigmas(
    sigmas: Tensor, start_step: int | None = None, last_step: int | None = None, force_full_denoise: bool = False
) -> Tensor | None:
    """KSamplerAdvanced's step window: stop after `last_step` (ending at 0 if `force_full_denoise`), start at
    `start_step`. None when the window holds no step, in which case the latent is returned unchanged."""
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return None
        sigmas = sigmas[start_step:]
    return sigmas


def prepare_mask(noise_mask: Tensor, shape: Sequence[int], device: torch.device | str) -> Tensor:
    """A LATENT's noise mask ((B | 1, [1,] H, W), any resolution) as the sampler uses it: resized to the latent's
    height and width (bilinear, on the CPU where the mask lives), repeated over the channels and cycled over the
    batch, then moved to `device` (ComfyUI's `prepare_mask` / `reshape_mask`)."""
    mask = noise_mask.reshape((-1, 1, noise_mask.shape[-2], noise_mask.shape[-1]))
    mask = F.interpolate(mask, size=tuple(shape[2:]), mode="bilinear")
    if mask.shape[1] < shape[1]:
        mask = mask.repeat((1, shape[1], 1, 1))[:, : shape[1]]
    return repeat_to_batch(mask, shape[0]).to(device)


def inpainting_model(
    guided: Callable[..., Tensor], model_sampling: ModelSampling, latent: Tensor, noise: Tensor, mask: Tensor
) -> Callable[..., Tensor]:
    """ComfyUI's KSamplerX0Inpaint: where `mask` is 0, the model sees `latent` noised to the current sigma and its
    prediction is replaced by `latent` (both in model space, on the sampling device)."""
    keep = 1.0 - mask

    def model(x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        x = x * mask + model_sampling.noise_scaling(sigma, noise, latent) * keep
        out = guided(x, sigma, **extra)
        return out * mask + latent * keep

    return model


def _inpaint_noise(noise: Tensor, seed: int, random: bool) -> Tensor:
    """The noise that re-noises the kept region: the sampling noise, or ComfyUI's fresh draw from seed + 1."""
    if not random:
        return noise
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    return torch.randn(noise.shape, generator=generator, device="cpu").to(noise.dtype).to(noise.device)


def sample_custom(
    model_fn: ModelFn,
    model_sampling: ModelSampling,
    latent_format: LatentFormat,
    positive: list[Cond],
    negative: list[Cond],
    latent: Tensor,
    *,
    sampler: str | Callable[..., Tensor],
    sigmas: Tensor,
    cfg: float,
    noise: Tensor,
    seed: int,
    callback: Callback | None = None,
    sampler_options: dict[str, Any] | None = None,
    noise_mask: Tensor | None = None,
) -> Tensor:
    """Sample from `latent` (raw, on the target device) along the given sigmas with the given noise.

    `sampler` is a name from `SAMPLERS` or a sampler function with the common signature; `sampler_options` are
    its keyword options (eta, s_noise, ...). `noise_mask` (a LATENT's "noise_mask") limits the change to where it
    is 1. The callback sees the model-space `denoised` of each step. Returns the raw latent, float32.
    """
    if sigmas.shape[-1] == 0:
        return latent
    device = latent.device
    mask = None if noise_mask is None else prepare_mask(noise_mask, latent.shape, device).float()
    noise = noise.to(device=device, dtype=torch.float32)
    latent = latent.to(device=device, dtype=torch.float32)
    sigmas = sigmas.to(device)
    if torch.count_nonzero(latent) > 0:  # an empty latent stays zero, as ComfyUI leaves it unshifted
        latent = latent_format.process_in(latent)
    sample_fn = get_sampler(sampler) if isinstance(sampler, str) else sampler
    guided = cfg_model(model_fn, positive, negative, cfg)
    if mask is not None:
        refill = _inpaint_noise(noise, seed, random=sampler == "ddim")
        guided = inpainting_model(guided, model_sampling, latent, refill, mask)
    x = model_sampling.noise_scaling(sigmas[0], noise, latent, is_max_denoise(model_sampling, float(sigmas[0])))
    samples = sample_fn(guided, x, sigmas, extra_args={"seed": seed}, callback=callback, **(sampler_options or {}))
    samples = model_sampling.inverse_noise_scaling(sigmas[-1], samples)
    return latent_format.process_out(samples.to(torch.float32))


def sample(
    model_fn: ModelFn,
    model_sampling: ModelSampling,
    latent_format: LatentFormat,
    positive: list[Cond],
    negative: list[Cond],
    latent: Tensor,
    *,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    denoise: float = 1.0,
    add_noise: bool = True,
    start_step: int | None = None,
    last_step: int | None = None,
    force_full_denoise: bool = False,
    sigmas: Tensor | None = None,
    callback: Callback | None = None,
    noise: Tensor | None = None,
    batch_index: Sequence[int] | None = None,
    noise_mask: Tensor | None = None,
) -> Tensor:
    """The KSampler node (and KSamplerAdvanced with its step window): raw latent in, raw latent out.

    `noise` overrides the seeded noise; `add_noise=False` samples from zero noise (the latent is taken to be
    noised already); `sigmas` overrides the computed schedule (the step window still applies); `noise_mask` is
    the LATENT's "noise_mask" (inpainting). With no step to take (denoise 0, an empty window) the latent comes
    back as given.
    """
    if noise is None:
        if add_noise:
            noise = prepare_noise(latent, seed, batch_index)
        else:
            noise = torch.zeros(latent.size(), dtype=latent.dtype, layout=latent.layout, device="cpu")
    if sigmas is None:
        sigmas = calculate_sigmas(model_sampling, scheduler, steps, sampler_name, denoise)
    window = slice_sigmas(sigmas, start_step, last_step, force_full_denoise)
    if window is None:
        return latent
    return sample_custom(
        model_fn, model_sampling, latent_format, positive, negative, latent,
        sampler=sampler_name, sigmas=window, cfg=cfg, noise=noise, seed=seed, callback=callback,
        noise_mask=noise_mask,
    )
