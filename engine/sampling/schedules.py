"""Noise schedules: the sigmas a sampler walks through, exactly as ComfyUI's KSampler schedulers compute them.

Scope: the scheduler list of ComfyUI's KSampler (comfy/samplers.py `SCHEDULER_HANDLERS`) in one name -> function
table, `SCHEDULERS`, each `(model_sampling, steps) -> sigmas` (float32 on the CPU, ending in 0 where ComfyUI
appends it), plus the closed-form schedules over `(n, sigma_min, sigma_max)` that the custom-sampling nodes use.

References:
- Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", eq. 5 (karras).
- Lee et al. 2024, "Beta Sampling is All You Need", arXiv:2407.12173 (beta).
- Genmo's Mochi preview sampler (linear_quadratic); AUTOMATIC1111 webui PR 15608 (kl_optimal, from
  Sabour et al. 2024, "Align Your Steps").
- Song et al. 2021, "Denoising Diffusion Implicit Models" (ddim_uniform's uniform stride).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy
import scipy.stats
import torch
from torch import Tensor

from engine.sampling.model_sampling import ModelSampling

Scheduler = Callable[[ModelSampling, int], Tensor]


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def get_sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: torch.device | str | None = None
) -> Tensor:
    """Karras et al. 2022 eq. 5: uniform steps in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def get_sigmas_exponential(
    n: int, sigma_min: float, sigma_max: float, device: torch.device | str | None = None
) -> Tensor:
    """Uniform steps in log sigma."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp())


def get_sigmas_polyexponential(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, device: torch.device | str | None = None
) -> Tensor:
    """A polynomial of degree rho in log sigma (rho = 1 is the exponential schedule)."""
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def get_sigmas_vp(
    n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3, device: torch.device | str | None = None
) -> Tensor:
    """The continuous VP schedule of Song et al. 2021 seen as sigmas."""
    t = torch.linspace(1, eps_s, n, device=device)
    return _append_zero(torch.sqrt(torch.special.expm1(beta_d * t**2 / 2 + beta_min * t)))


def get_sigmas_kl_optimal(
    n: int, sigma_min: float, sigma_max: float, device: torch.device | str | None = None
) -> Tensor:
    """Uniform steps in arctan(sigma), the KL-optimal schedule of "Align Your Steps"."""
    if n < 2:
        # ComfyUI divides by n - 1 here and samples with NaN sigmas; refuse instead.
        raise ValueError(f"kl_optimal needs at least 2 steps, got {n}")
    adj_idxs = torch.arange(n, dtype=torch.float32, device=device).div_(n - 1)
    sigmas = adj_idxs.new_zeros(n + 1)
    sigmas[:-1] = (adj_idxs * math.atan(sigma_min) + (1 - adj_idxs) * math.atan(sigma_max)).tan_()
    return sigmas


def simple_scheduler(model_sampling: ModelSampling, steps: int) -> Tensor:
    """Every (1000 / steps)-th entry of the training sigmas, from the top, indices truncated."""
    table = model_sampling.sigmas
    stride = len(table) / steps
    sigs = [float(table[-(1 + int(x * stride))]) for x in range(steps)]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def ddim_uniform_scheduler(model_sampling: ModelSampling, steps: int) -> Tensor:
    """Training sigmas at timesteps 1, 1 + k, 1 + 2k, ... with k = 1000 // steps, reversed, then 0.

    The integer stride can yield more than `steps` sigmas (30 steps give 31), as in ComfyUI.
    """
    table = model_sampling.sigmas
    if math.isclose(float(table[1]), 0, abs_tol=0.00001):
        steps += 1
        sigs = []
    else:
        sigs = [0.0]
    stride = max(len(table) // steps, 1)
    sigs += [float(table[x]) for x in range(1, len(table), stride)]
    return torch.tensor(sigs[::-1], dtype=torch.float32)


def _timestep_scheduler(model_sampling: ModelSampling, steps: int, sgm: bool) -> Tensor:
    start = model_sampling.timestep(model_sampling.sigma_max)
    end = model_sampling.timestep(model_sampling.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(model_sampling.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(model_sampling.sigma(ts)) for ts in timesteps]
    return torch.tensor(sigs + ([0.0] if append_zero else []), dtype=torch.float32)


def normal_scheduler(model_sampling: ModelSampling, steps: int) -> Tensor:
    """`steps` timesteps evenly spaced from the top to the bottom of the table, both ends included, then 0.

    A schedule whose lowest sigma is already 0 gets one more step instead of an appended 0.
    """
    return _timestep_scheduler(model_sampling, steps, sgm=False)


def sgm_uniform_scheduler(model_sampling: ModelSampling, steps: int) -> Tensor:
    """As `normal`, but over `steps + 1` evenly spaced timesteps with the last one dropped (SGM's spacing)."""
    return _timestep_scheduler(model_sampling, steps, sgm=True)


def beta_scheduler(model_sampling: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Timesteps at the quantiles of a Beta(alpha, beta) distribution, rounded; repeated timesteps collapse."""
    total_timesteps = len(model_sampling.sigmas) - 1
    ts = 1 - numpy.linspace(0, 1, steps, endpoint=False)
    ts = numpy.rint(scipy.stats.beta.ppf(ts, alpha, beta) * total_timesteps)
    sigs = []
    last_t = -1
    for t in ts:
        if t != last_t:
            sigs.append(float(model_sampling.sigmas[int(t)]))
        last_t = t
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def linear_quadratic_scheduler(
    model_sampling: ModelSampling, steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> Tensor:
    """Noise fraction linear up to `threshold_noise` for the first half, quadratic to 1 after, times sigma_max."""
    if steps == 1:
        fractions = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        threshold_noise_step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = threshold_noise_step_diff / (linear_steps * quadratic_steps**2)
        linear_coef = threshold_noise / linear_steps - 2 * threshold_noise_step_diff / (quadratic_steps**2)
        const = quadratic_coef * (linear_steps**2)
        quadratic = [quadratic_coef * (i**2) + linear_coef * i + const for i in range(linear_steps, steps)]
        fractions = [1.0 - x for x in linear + quadratic + [1.0]]
    return torch.tensor(fractions, dtype=torch.float32) * model_sampling.sigma_max.cpu()


def _over_sigma_range(schedule: Callable[..., Tensor]) -> Scheduler:
    """Adapt an `(n, sigma_min, sigma_max)` schedule to the table's `(model_sampling, steps)` form."""

    def scheduler(model_sampling: ModelSampling, steps: int) -> Tensor:
        return schedule(steps, float(model_sampling.sigma_min), float(model_sampling.sigma_max))

    scheduler.__name__ = schedule.__name__
    scheduler.__doc__ = schedule.__doc__
    return scheduler


# ComfyUI's KSampler scheduler list, in its order.
SCHEDULERS: dict[str, Scheduler] = {
    "simple": simple_scheduler,
    "sgm_uniform": sgm_uniform_scheduler,
    "karras": _over_sigma_range(get_sigmas_karras),
    "exponential": _over_sigma_range(get_sigmas_exponential),
    "ddim_uniform": ddim_uniform_scheduler,
    "beta": beta_scheduler,
    "normal": normal_scheduler,
    "linear_quadratic": linear_quadratic_scheduler,
    "kl_optimal": _over_sigma_range(get_sigmas_kl_optimal),
}
SCHEDULER_NAMES: list[str] = list(SCHEDULERS)


def scheduler_sigmas(model_sampling: ModelSampling, scheduler: str, steps: int) -> Tensor:
    """The sigmas of the named scheduler (ComfyUI's `calculate_sigmas`)."""
    try:
        schedule = SCHEDULERS[scheduler]
    except KeyError:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {SCHEDULER_NAMES}") from None
    return schedule(model_sampling, steps)
