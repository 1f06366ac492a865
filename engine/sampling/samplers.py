"""Samplers: plain functions that integrate the probability-flow ODE / reverse SDE over a list of sigmas.

Scope: the samplers of ComfyUI's KSampler list that this engine serves, with ComfyUI's defaults and arithmetic
(comfy/k_diffusion/sampling.py, comfy/k_diffusion/deis.py, comfy/extra_samplers/uni_pc.py), looked up in one
name -> function table, `SAMPLERS`. Every sampler has the signature

    sample_x(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, **options) -> Tensor

where `model(x, sigma_batch, **extra_args) -> denoised` (the data prediction D(x; sigma) of Karras et al. 2022),
`x` is the noised starting latent (noise already scaled to sigmas[0]) and `sigmas` is a 1-D tensor on x's device.
`callback` receives `{"x", "i", "sigma", "sigma_hat", "denoised"}` once per step (plus method-specific keys).

Randomness enters only through `noise_sampler(sigma, sigma_next) -> noise like x`. The default is ComfyUI's: a
torch.Generator on x's device seeded with `extra_args["seed"]` (plus one on the CPU, so that it differs from the
initial noise drawn from the same seed), or a Brownian tree (torchsde) for the SDE samplers. Samplers call it with
the step's sigmas as 0-dim CPU float32 tensors.

Control flow (is the next sigma 0? which order this step?) reads a CPU copy of the sigmas made once before the
loop; the arithmetic runs on the sigmas' device with ComfyUI's operation order, so nothing inside a step waits on
the device. `dpm_adaptive` is the exception: its accept/reject decision needs each step's error on the host.

References:
- Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (euler, heun, dpm_2).
- Lu et al. 2022, "DPM-Solver" (dpm_fast, dpm_adaptive) and "DPM-Solver++" (dpmpp_2s_ancestral, dpmpp_2m, the
  SDE variants dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde).
- Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models" (lms in sigma, ipndm).
- Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator" (deis).
- Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework" (uni_pc, uni_pc_bh2).
- Ho et al. 2020, "DDPM" (ddpm); Luo et al. 2023, "Latent Consistency Models" (lcm).
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Callable, Sequence

import numpy
import torch
import torchsde
from scipy import integrate
from torch import Tensor

Model = Callable[..., Tensor]
NoiseSampler = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]

# For these samplers KSampler asks the scheduler for one step more and drops the penultimate sigma, so the last step
# goes from a larger sigma straight to the end (ComfyUI's KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS).
DISCARD_PENULTIMATE_SIGMA_SAMPLERS: frozenset[str] = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


# ----------------------------------------------------------------------------------------------------------------
# Shared step fragments
# ----------------------------------------------------------------------------------------------------------------


def append_dims(x: Tensor, target_dims: int) -> Tensor:
    """Append singleton dimensions so that x broadcasts against a tensor of `target_dims` dimensions."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The Karras ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor | float]:
    """Split an ancestral step from sigma_from to sigma_to into a deterministic step down to sigma_down and fresh
    noise of standard deviation sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2 (eta = 1 is DDPM's variance).
    """
    if not eta:
        return sigma_to, 0.0
    proposed = eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_up = torch.where(proposed < sigma_to, proposed, sigma_to)  # Python's min(), without leaving the device
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def default_noise_sampler(x: Tensor, seed: int | None = None) -> NoiseSampler:
    """Independent Gaussian noise like x from a generator on x's device, seeded as ComfyUI seeds it."""
    generator = torch.Generator(device=x.device)
    if seed is None:
        generator.seed()
    else:
        # On the CPU the initial noise came from the same seed; shift it so the two streams differ (as ComfyUI),
        # wrapping so that the largest seed stays valid (ComfyUI raises there)
        generator.manual_seed((seed + 1) % 2**64 if x.device == torch.device("cpu") else seed)

    def sample(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return sample


class BrownianTreeNoiseSampler:
    """Noise from a Brownian motion W fixed by its seed: (W(t1) - W(t0)) / sqrt|t1 - t0| with t = sigma.

    Queries at any pair of sigmas are consistent with one path, so the noise does not depend on the step count
    (k-diffusion's BrownianTreeNoiseSampler; torchsde.BrownianTree with `entropy=seed`). `cpu=True` builds the
    tree on the CPU as ComfyUI does for the non-`_gpu` samplers; a list of seeds gives one tree per batch item.
    """

    def __init__(
        self, x: Tensor, sigma_min: float, sigma_max: float, seed: int | Sequence[int] | None = None, cpu: bool = True
    ) -> None:
        t0, t1 = sorted((float(sigma_min), float(sigma_max)))
        self._sign = 1 if float(sigma_min) < float(sigma_max) else -1
        self._device = x.device
        w0 = torch.zeros_like(x, device="cpu" if cpu else x.device)
        self._batched = isinstance(seed, (tuple, list))
        if self._batched:
            if len(seed) != x.shape[0]:
                raise ValueError(f"got {len(seed)} seeds for a batch of {x.shape[0]}: pass one seed per batch item")
            seeds, w0 = list(seed), w0[0]
        else:
            seeds = [secrets.randbelow(2**63 - 1) if seed is None else seed]
        self._trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds]

    def __call__(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        t0 = torch.as_tensor(sigma).cpu()
        t1 = torch.as_tensor(sigma_next).cpu()
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w = torch.stack([tree(float(lo), float(hi)) for tree in self._trees])
        w = w.to(device=self._device, dtype=t0.dtype) * (self._sign * sign)
        w = w if self._batched else w[0]
        return w / (t1 - t0).abs().sqrt()


def _brownian_sampler(x: Tensor, host: Tensor, extra_args: dict, cpu: bool) -> BrownianTreeNoiseSampler:
    """The Brownian tree over the schedule's positive sigma range, seeded with the run's seed."""
    return BrownianTreeNoiseSampler(x, host[host > 0].min(), host.max(), seed=extra_args.get("seed"), cpu=cpu)


def _host(sigmas: Tensor) -> Tensor:
    """The CPU copy of the schedule that steers control flow (one device-to-host copy, before the loop)."""
    return sigmas.detach().to("cpu")


def _churn(
    x: Tensor, sigma: Tensor, sigma_host: Tensor, n_steps: int, s_churn: float, s_tmin: float, s_tmax: float,
    s_noise: float, noise_sampler: NoiseSampler | None,
) -> tuple[Tensor, Tensor]:
    """Algorithm 2 lines 4-6 of Karras et al. 2022: raise the noise level to sigma_hat = sigma (1 + gamma).

    ComfyUI draws this noise from the global torch generator; here it comes from the noise sampler (see
    `_churn_noise`). KSampler never sets s_churn, so its results are unaffected.
    """
    in_range = s_tmin <= float(sigma_host) <= s_tmax
    gamma = min(s_churn / n_steps, 2**0.5 - 1) if s_churn > 0 and in_range else 0.0
    if gamma <= 0 or noise_sampler is None:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    eps = noise_sampler(sigma_host, sigma_host * (gamma + 1)) * s_noise
    return x + eps * (sigma_hat**2 - sigma**2) ** 0.5, sigma_hat


def _churn_noise(x: Tensor, s_churn: float, extra_args: dict, noise_sampler: NoiseSampler | None):
    """The noise sampler for churn: the given one, else a seeded default one when churn is on."""
    if noise_sampler is not None or s_churn <= 0:
        return noise_sampler
    return default_noise_sampler(x, extra_args.get("seed"))


def _report(callback: Callback | None, x: Tensor, i: int, sigma: Tensor, sigma_hat: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


# ----------------------------------------------------------------------------------------------------------------
# Karras et al. 2022: Euler, Heun, DPM-2 and their ancestral forms
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
    s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> Tensor:
    """Algorithm 2 of Karras et al. 2022 with Euler steps."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _churn_noise(x, s_churn, extra_args, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    host_t = _host(sigmas)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(
            x, sigmas[i], host_t[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler
        )
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


def sample_ddim(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DDIM (eta = 0) is the Euler method in sigma (Karras et al. 2022, section 4), which is what ComfyUI runs.

    ComfyUI's "ddim" differs from "euler" only in drawing separate inpainting noise (seed + 1) for masked latents.
    """
    return sample_euler(model, x, sigmas, extra_args=extra_args, callback=callback, noise_sampler=noise_sampler)


@torch.no_grad()
def sample_euler_ancestral(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """Euler steps down to sigma_down, then fresh noise of sigma_up (ancestral sampling)."""
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    host = _host(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if float(get_ancestral_step(host[i], host[i + 1], eta=eta)[0]) == 0:
            x = denoised
        else:
            d = to_d(x, sigmas[i], denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt + noise_sampler(host[i], host[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
    s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> Tensor:
    """Algorithm 2 of Karras et al. 2022: Heun's second-order method, Euler on the step to sigma = 0."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _churn_noise(x, s_churn, extra_args, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    host_t = _host(sigmas)
    host = host_t.tolist()
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(
            x, sigmas[i], host_t[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler
        )
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if host[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_heunpp2(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
    s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> Tensor:
    """Heun++ (Carzit's sd-webui-samplers-scheduler, as ComfyUI has it): the step uses a weighted mean of the
    derivatives at sigma_i and at two Euler predictions ahead, at sigma_i+1 and sigma_i+2, weighted sigma_i+1 and
    sigma_i+2 over 3 sigma_0 (the rest on the first); Heun-like with two points before the last step, Euler on it.
    As the weights shrink with sigma it behaves like a first-order method late in sampling."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _churn_noise(x, s_churn, extra_args, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    host_t = _host(sigmas)
    host = host_t.tolist()
    s_end = host[-1]
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(
            x, sigmas[i], host_t[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler
        )
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if host[i + 1] == s_end:
            x = x + d * dt
        elif host[i + 2] == s_end:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            w1 = 1 - w2
            x = x + (d * w1 + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            denoised_3 = model(x_3, sigmas[i + 2] * s_in, **extra_args)
            d_3 = to_d(x_3, sigmas[i + 2], denoised_3)
            w = 3 * sigmas[0]
            w2 = sigmas[i + 1] / w
            w3 = sigmas[i + 2] / w
            w1 = 1 - w2 - w3
            x = x + (w1 * d + w2 * d_2 + w3 * d_3) * dt
    return x


def _dpm_2_step(model: Model, x: Tensor, d: Tensor, sigma: Tensor, sigma_to: Tensor, s_in: Tensor, extra_args: dict):
    """DPM-Solver-2 in sigma: the derivative at the log-midpoint of [sigma_to, sigma] carries the whole step."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
    d_2 = to_d(x_2, sigma_mid, denoised_2)
    return x + d_2 * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
    s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-2 steps inside Algorithm 2 of Karras et al. 2022; Euler on the step to sigma = 0."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _churn_noise(x, s_churn, extra_args, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    host_t = _host(sigmas)
    host = host_t.tolist()
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(
            x, sigmas[i], host_t[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler
        )
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        if host[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            x = _dpm_2_step(model, x, d, sigma_hat, sigmas[i + 1], s_in, extra_args)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-2 steps down to sigma_down, then fresh noise of sigma_up."""
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    host = _host(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if float(get_ancestral_step(host[i], host[i + 1], eta=eta)[0]) == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm_2_step(model, x, d, sigmas[i], sigma_down, s_in, extra_args)
            x = x + noise_sampler(host[i], host[i + 1]) * s_noise * sigma_up
    return x


# ----------------------------------------------------------------------------------------------------------------
# Linear multistep (LMS)
# ----------------------------------------------------------------------------------------------------------------


def linear_multistep_coeff(order: int, t: numpy.ndarray, i: int, j: int) -> float:
    """The weight of the j-th previous derivative: the integral over [t_i, t_i+1] of the Lagrange basis
    polynomial through t_i, ..., t_i-order+1 that is 1 at t_i-j (numerically, as k-diffusion does)."""
    if order - 1 > i:
        raise ValueError(f"order {order} is too high for step {i}")

    def basis(tau: float):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


@torch.no_grad()
def sample_lms(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, order: int = 4,
) -> Tensor:
    """Linear multistep in sigma of up to `order` previous derivatives; the step to sigma = 0 returns D(x)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    # ComfyUI integrates over the float32 sigmas as a numpy array; the coefficients follow numpy's casting rules.
    sigmas_np = _host(sigmas).numpy()
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        ds = (ds + [d])[-order:]
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas_np[i + 1] == 0:
            x = denoised
        else:
            cur_order = min(i + 1, order)
            coeffs = [linear_multistep_coeff(cur_order, sigmas_np, i, j) for j in range(cur_order)]
            x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


# ----------------------------------------------------------------------------------------------------------------
# DPM-Solver (Lu et al. 2022) in t = -log(sigma): fixed-step "fast" and adaptive
# ----------------------------------------------------------------------------------------------------------------


def _sigma_of_t(t: Tensor) -> Tensor:
    return t.neg().exp()


def _t_of_sigma(sigma: Tensor) -> Tensor:
    return -sigma.log()


class _EpsAt:
    """The noise prediction eps(x, t) = (x - D(x; sigma(t))) / sigma(t) that DPM-Solver integrates."""

    def __init__(self, model: Model, extra_args: dict) -> None:
        self.model, self.extra_args = model, extra_args

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        sigma = _sigma_of_t(t) * x.new_ones([x.shape[0]])
        return (x - self.model(x, sigma, **self.extra_args)) / _sigma_of_t(t)


def _dpm_solver_1_step(x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor) -> Tensor:
    """DPM-Solver-1 (equivalent to DDIM): one exponential-integrator step with a constant eps."""
    h = t_next - t
    return x - _sigma_of_t(t_next) * h.expm1() * eps


def _dpm_solver_2_step(
    eps_at: _EpsAt, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor, r1: float = 1 / 2
) -> tuple[Tensor, Tensor]:
    """DPM-Solver-2 (Algorithm 1 of Lu et al. 2022); returns the step and eps at the intermediate point."""
    h = t_next - t
    s1 = t + r1 * h
    u1 = x - _sigma_of_t(s1) * (r1 * h).expm1() * eps
    eps_r1 = eps_at(u1, s1)
    x_2 = x - _sigma_of_t(t_next) * h.expm1() * eps - _sigma_of_t(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
    return x_2, eps_r1


def _dpm_solver_3_step(
    eps_at: _EpsAt, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor, r1: float = 1 / 3, r2: float = 2 / 3,
    eps_r1: Tensor | None = None,
) -> Tensor:
    """DPM-Solver-3 (Algorithm 2 of Lu et al. 2022); `eps_r1` reuses an evaluation at t + r1 h if one exists."""
    h = t_next - t
    s1 = t + r1 * h
    s2 = t + r2 * h
    if eps_r1 is None:
        u1 = x - _sigma_of_t(s1) * (r1 * h).expm1() * eps
        eps_r1 = eps_at(u1, s1)
    u2 = (
        x
        - _sigma_of_t(s2) * (r2 * h).expm1() * eps
        - _sigma_of_t(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
    )
    eps_r2 = eps_at(u2, s2)
    return x - _sigma_of_t(t_next) * h.expm1() * eps - _sigma_of_t(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


def _dpm_solver_range(sigmas: Tensor, host: list[float]) -> tuple[Tensor, Tensor] | None:
    """ComfyUI's wrapper: integrate from sigmas[0] down to the last non-zero sigma; None when there is no step."""
    if len(sigmas) <= 1:
        return None
    sigma_min, sigma_min_host = (sigmas[-2], host[-2]) if host[-1] == 0 else (sigmas[-1], host[-1])
    if sigma_min_host <= 0 or host[0] <= 0:
        raise ValueError("DPM-Solver needs positive sigma_min and sigma_max; the schedule has a zero before its end")
    return sigma_min, sigmas[0]


@torch.no_grad()
def sample_dpm_fast(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 0.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-fast: len(sigmas) - 1 model evaluations spent as third-order steps (ending in a second- and
    first-order one) uniformly spaced in t = -log(sigma) between the first and the last non-zero sigma; the given
    sigmas fix only the range and the budget."""
    extra_args = {} if extra_args is None else extra_args
    host = _host(sigmas).tolist()
    span = _dpm_solver_range(sigmas, host)
    if span is None:
        return x
    sigma_min, sigma_max = span
    if noise_sampler is None and eta:
        noise_sampler = default_noise_sampler(x, extra_args.get("seed"))
    nfe = len(sigmas) - 1
    t_start, t_end = _t_of_sigma(sigma_max), _t_of_sigma(sigma_min)
    eps_at = _EpsAt(model, extra_args)
    m = math.floor(nfe / 3) + 1
    ts = torch.linspace(t_start.item(), t_end.item(), m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        if eta:
            sd, _ = get_ancestral_step(_sigma_of_t(t), _sigma_of_t(t_next), eta)
            t_next_ = torch.minimum(t_end, _t_of_sigma(sd))
            su = (_sigma_of_t(t_next) ** 2 - _sigma_of_t(t_next_) ** 2) ** 0.5
        else:
            t_next_, su = t_next, 0.0
        eps = eps_at(x, t)
        denoised = x - _sigma_of_t(t) * eps
        if callback is not None:
            callback({"x": x, "i": i, "t": ts[i], "t_up": t, "denoised": denoised,
                      "sigma": _sigma_of_t(ts[i]), "sigma_hat": _sigma_of_t(t)})
        if order == 1:
            x = _dpm_solver_1_step(x, t, t_next_, eps)
        elif order == 2:
            x, _ = _dpm_solver_2_step(eps_at, x, t, t_next_, eps)
        else:
            x = _dpm_solver_3_step(eps_at, x, t, t_next_, eps)
        if eta:
            # ComfyUI also draws (and multiplies by su = 0) when eta is 0; that draw changes nothing.
            x = x + su * s_noise * noise_sampler(_sigma_of_t(t), _sigma_of_t(t_next))
    return x


class _PIDStepSizeController:
    """PID control of the step size from the local error estimate (Söderlind 2003), as k-diffusion does."""

    def __init__(
        self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float = 1, accept_safety: float = 0.81,
        eps: float = 1e-8,
    ) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, order: int = 3, rtol: float = 0.05, atol: float = 0.0078,
    h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
    eta: float = 0.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-12 / 23 with adaptive step size (Lu et al. 2022, section 4.2): a lower- and a higher-order
    step share evaluations and their difference drives a PID step-size controller. Only the first and last non-zero
    sigmas matter. Each accept/reject decision reads the error on the host."""
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order}")
    extra_args = {} if extra_args is None else extra_args
    host = _host(sigmas).tolist()
    span = _dpm_solver_range(sigmas, host)
    if span is None:
        return x
    sigma_min, sigma_max = span
    if noise_sampler is None and eta:
        noise_sampler = default_noise_sampler(x, extra_args.get("seed"))
    t_start, t_end = _t_of_sigma(sigma_max), _t_of_sigma(sigma_min)
    forward = bool(t_end > t_start)
    if not forward and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    eps_at = _EpsAt(model, extra_args)
    h_init = abs(h_init) * (1 if forward else -1)
    atol_t = torch.tensor(atol, device=x.device)
    rtol_t = torch.tensor(rtol, device=x.device)
    s = t_start
    x_prev = x
    pid = _PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    while bool(s < t_end - 1e-5) if forward else bool(s > t_end + 1e-5):
        t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
        if eta:
            sd, _ = get_ancestral_step(_sigma_of_t(s), _sigma_of_t(t), eta)
            t_ = torch.minimum(t_end, _t_of_sigma(sd))
            su = (_sigma_of_t(t) ** 2 - _sigma_of_t(t_) ** 2) ** 0.5
        else:
            t_, su = t, 0.0
        eps = eps_at(x, s)
        denoised = x - _sigma_of_t(s) * eps
        if order == 2:
            x_low = _dpm_solver_1_step(x, s, t_, eps)
            x_high, _ = _dpm_solver_2_step(eps_at, x, s, t_, eps)
        else:
            x_low, eps_r1 = _dpm_solver_2_step(eps_at, x, s, t_, eps, r1=1 / 3)
            x_high = _dpm_solver_3_step(eps_at, x, s, t_, eps, eps_r1=eps_r1)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        accept = pid.propose_step(float(error))
        if accept:
            x_prev = x_low
            x = x_high
            if eta:
                x = x + su * s_noise * noise_sampler(_sigma_of_t(s), _sigma_of_t(t))
            s = t
            info["n_accept"] += 1
        else:
            info["n_reject"] += 1
        info["nfe"] += order
        info["steps"] += 1
        if callback is not None:
            callback({"x": x, "i": info["steps"] - 1, "t": s, "t_up": s, "denoised": denoised, "error": error,
                      "h": pid.h, "sigma": _sigma_of_t(s), "sigma_hat": _sigma_of_t(s), **info})
    return x


# ----------------------------------------------------------------------------------------------------------------
# DPM-Solver++ (Lu et al. 2022b) in lambda = -log(sigma), data prediction
# ----------------------------------------------------------------------------------------------------------------


def _half_log_snr(sigma: Tensor) -> Tensor:
    """lambda = log(alpha / sigma) for the variance-exploding view, alpha = 1."""
    return sigma.log().neg()


def _sigma_of_lambda(half_log_snr: Tensor) -> Tensor:
    return half_log_snr.neg().exp()


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2S) single-step second-order steps down to sigma_down, then fresh noise of sigma_up."""
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    host = _host(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if float(get_ancestral_step(host[i], host[i + 1], eta=eta)[0]) == 0:
            d = to_d(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i])
        else:
            t, t_next = _half_log_snr(sigmas[i]), _half_log_snr(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (_sigma_of_lambda(s) / _sigma_of_lambda(t)) * x - (-h * r).expm1() * denoised
            denoised_2 = model(x_2, _sigma_of_lambda(s) * s_in, **extra_args)
            x = (_sigma_of_lambda(t_next) / _sigma_of_lambda(t)) * x - (-h).expm1() * denoised_2
        if float(host[i + 1]) > 0:
            x = x + noise_sampler(host[i], host[i + 1]) * s_noise * sigma_up
    return x


def _dpmpp_sde_midpoint(sigma: Tensor, sigma_next: Tensor, r: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """lambda at both ends of the step, the intermediate lambda at fraction r, and its sigma."""
    lambda_s, lambda_t = _half_log_snr(sigma), _half_log_snr(sigma_next)
    lambda_s_1 = lambda_s + r * (lambda_t - lambda_s)
    return lambda_s, lambda_t, lambda_s_1, _sigma_of_lambda(lambda_s_1)


@torch.no_grad()
def sample_dpmpp_sde(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0, r: float = 1 / 2,
) -> Tensor:
    """DPM-Solver++ (stochastic): a second-order single-step SDE solver with an intermediate point at fraction r
    of the step in lambda; noise from a Brownian tree on the CPU."""
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    host = _host(sigmas)
    if noise_sampler is None:
        noise_sampler = _brownian_sampler(x, host, extra_args, cpu=True)
    s_in = x.new_ones([x.shape[0]])
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if float(host[i + 1]) == 0:
            x = denoised
            continue
        lambda_s, lambda_t, lambda_s_1, sigma_s_1 = _dpmpp_sde_midpoint(sigmas[i], sigmas[i + 1], r)
        sigma_s_1_host = _dpmpp_sde_midpoint(host[i], host[i + 1], r)[3]
        alpha_s = sigmas[i] * lambda_s.exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        # Step 1: an ancestral DPM-Solver++(1) step to the intermediate point.
        sd, su = get_ancestral_step(lambda_s.neg().exp(), lambda_s_1.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s_1 * noise_sampler(host[i], sigma_s_1_host) * s_noise * su
        denoised_2 = model(x_2, sigma_s_1 * s_in, **extra_args)

        # Step 2: the full step with the midpoint-corrected data prediction.
        sd, su = get_ancestral_step(lambda_s.neg().exp(), lambda_t.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise_sampler(host[i], host[i + 1]) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2M): second-order multistep, the previous data prediction extrapolated by the step ratio."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    host = _host(sigmas).tolist()
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        t, t_next = _half_log_snr(sigmas[i]), _half_log_snr(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or host[i + 1] == 0:
            x = (_sigma_of_lambda(t_next) / _sigma_of_lambda(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - _half_log_snr(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_of_lambda(t_next) / _sigma_of_lambda(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) SDE: the multistep solver of the variance-preserving reverse SDE, noise from a Brownian
    tree; the second-order correction is the 'midpoint' or the 'heun' form."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    host = _host(sigmas)
    if noise_sampler is None:
        noise_sampler = _brownian_sampler(x, host, extra_args, cpu=True)
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    h, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if float(host[i + 1]) == 0:
            x = denoised
        else:
            lambda_s, lambda_t = _half_log_snr(sigmas[i]), _half_log_snr(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                noise = noise_sampler(host[i], host[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep from the two previous data predictions (second order on the
    second step, first order on the first), noise from a Brownian tree."""
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    host = _host(sigmas)
    if noise_sampler is None:
        noise_sampler = _brownian_sampler(x, host, extra_args, cpu=True)
    s_in = x.new_ones([x.shape[0]])
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if float(host[i + 1]) == 0:
            x = denoised
        else:
            lambda_s, lambda_t = _half_log_snr(sigmas[i]), _half_log_snr(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0 = h_1 / h
                r1 = h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * d
            if eta > 0 and s_noise > 0:
                noise = noise_sampler(host[i], host[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def _gpu_tree(x: Tensor, sigmas: Tensor, extra_args: dict | None, noise_sampler: NoiseSampler | None):
    """The Brownian tree on x's device for the `_gpu` variants (unless a noise sampler is given)."""
    if noise_sampler is not None or len(sigmas) <= 1:
        return noise_sampler
    return _brownian_sampler(x, _host(sigmas), {} if extra_args is None else extra_args, cpu=False)


def sample_dpmpp_sde_gpu(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0, r: float = 1 / 2,
) -> Tensor:
    """DPM-Solver++ (stochastic) with the Brownian tree on x's device."""
    noise_sampler = _gpu_tree(x, sigmas, extra_args, noise_sampler)
    return sample_dpmpp_sde(model, x, sigmas, extra_args=extra_args, callback=callback,
                            noise_sampler=noise_sampler, eta=eta, s_noise=s_noise, r=r)


def sample_dpmpp_2m_sde_gpu(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) SDE with the Brownian tree on x's device."""
    noise_sampler = _gpu_tree(x, sigmas, extra_args, noise_sampler)
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args=extra_args, callback=callback,
                               noise_sampler=noise_sampler, eta=eta, s_noise=s_noise, solver_type=solver_type)


def sample_dpmpp_3m_sde_gpu(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(3M) SDE with the Brownian tree on x's device."""
    noise_sampler = _gpu_tree(x, sigmas, extra_args, noise_sampler)
    return sample_dpmpp_3m_sde(model, x, sigmas, extra_args=extra_args, callback=callback,
                               noise_sampler=noise_sampler, eta=eta, s_noise=s_noise)


# ----------------------------------------------------------------------------------------------------------------
# DDPM and LCM
# ----------------------------------------------------------------------------------------------------------------


def _ddpm_posterior_step(
    x: Tensor, sigma: Tensor, sigma_prev: Tensor, eps: Tensor, noise: Callable[[], Tensor], add_noise: bool
) -> Tensor:
    """Eq. 11 of Ho et al. 2020 on the variance-preserving x: the posterior mean, plus its standard deviation
    times fresh noise unless this is the final step."""
    alpha_cumprod = 1 / ((sigma * sigma) + 1)
    alpha_cumprod_prev = 1 / ((sigma_prev * sigma_prev) + 1)
    alpha = alpha_cumprod / alpha_cumprod_prev
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
    if add_noise:
        mu = mu + ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt() * noise()
    return mu


@torch.no_grad()
def sample_ddpm(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral DDPM sampling (Algorithm 2 of Ho et al. 2020) between the given sigmas."""
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    host = _host(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x_vp = x / torch.sqrt(1.0 + sigmas[i] ** 2.0)  # VE x to VP x
        eps = (x - denoised) / sigmas[i]
        draw = lambda: noise_sampler(host[i], host[i + 1])  # noqa: E731  (only the non-final steps draw)
        x = _ddpm_posterior_step(x_vp, sigmas[i], sigmas[i + 1], eps, draw, float(host[i + 1]) > 0)
        if float(host[i + 1]) != 0:
            x = x * torch.sqrt(1.0 + sigmas[i + 1] ** 2.0)
    return x


def _ve_noise_scaling(sigma: Tensor, noise: Tensor, latent: Tensor) -> Tensor:
    return noise * sigma + latent


@torch.no_grad()
def sample_lcm(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    noise_scaling: Callable[[Tensor, Tensor, Tensor], Tensor] = _ve_noise_scaling,
) -> Tensor:
    """Latent Consistency Model multistep sampling: jump to the prediction, re-noise to the next sigma.
    `noise_scaling(sigma, noise, latent)` is the model's forward noising (latent + sigma * noise for eps/v)."""
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    host = _host(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = denoised
        if float(host[i + 1]) > 0:
            x = noise_scaling(sigmas[i + 1], noise_sampler(host[i], host[i + 1]), x)
    return x


# ----------------------------------------------------------------------------------------------------------------
# iPNDM and DEIS (zju-pi/diff-sampler, as ComfyUI ports them)
# ----------------------------------------------------------------------------------------------------------------


def _shift_in(buffer: list[Tensor], d: Tensor, max_order: int) -> None:
    """Keep the last max_order - 1 derivatives, oldest first."""
    buffer.append(d)
    del buffer[: max(0, len(buffer) - (max_order - 1))]


@torch.no_grad()
def sample_ipndm(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, max_order: int = 4,
) -> Tensor:
    """Improved PNDM: Adams-Bashforth steps in sigma with the fixed-step coefficients of orders 1-4."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    host = _host(sigmas).tolist()
    buffer: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t_cur * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        if host[i + 1] == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        elif order == 2:
            x_next = x + (t_next - t_cur) * (3 * d_cur - buffer[-1]) / 2
        elif order == 3:
            x_next = x + (t_next - t_cur) * (23 * d_cur - 16 * buffer[-1] + 5 * buffer[-2]) / 12
        else:
            x_next = x + (t_next - t_cur) * (55 * d_cur - 59 * buffer[-1] + 37 * buffer[-2] - 9 * buffer[-3]) / 24
        _shift_in(buffer, d_cur, max_order)
        x = x_next
    return x


def _ipndm_v_coefficients(t: Tensor, i: int, order: int) -> list[Tensor]:
    """Variable-step Adams-Bashforth coefficients for the current and previous derivatives (orders 1-4)."""
    h_n = t[i + 1] - t[i]
    if order == 1:
        return [torch.ones_like(h_n)]
    h_n_1 = t[i] - t[i - 1]
    if order == 2:
        return [(2 + (h_n / h_n_1)) / 2, -(h_n / h_n_1) / 2]
    h_n_2 = t[i - 1] - t[i - 2]
    temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
    if order == 3:
        return [
            (2 + (h_n / h_n_1)) / 2 + temp1,
            -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1,
            temp1 * h_n_1 / h_n_2,
        ]
    h_n_3 = t[i - 2] - t[i - 3]
    temp2 = (
        (1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))
    ) * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
    ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
    return [
        (2 + (h_n / h_n_1)) / 2 + temp1 + temp2,
        -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + (h_n_1 / h_n_2) + ratio) * temp2,
        temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + ratio * (1 + h_n_2 / h_n_3)) * temp2,
        -temp2 * ratio * h_n_1 / h_n_2,
    ]


@torch.no_grad()
def sample_ipndm_v(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, max_order: int = 4,
) -> Tensor:
    """iPNDM with variable-step coefficients computed from the actual sigma spacing."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    host = _host(sigmas).tolist()
    buffer: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t_cur * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        if host[i + 1] == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        else:
            coeffs = _ipndm_v_coefficients(sigmas, i, order)
            combo = coeffs[0] * d_cur
            for k in range(1, order):
                combo = combo + coeffs[k] * buffer[-k]
            x_next = x + (t_next - t_cur) * combo
        _shift_in(buffer, d_cur, max_order)
        x = x_next
    return x


def _edm_to_vp_time(sigmas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Map sigmas to the time t of the VP SDE that spans EDM's sigma range [0.002, 80] over t in [1e-3, 1].

    Returns t (float32) and beta_0, beta_1 (float64), with the reference's float32/float64 mix: the small end's
    log is numpy's float32 log, and the float64 betas meet the float32 sigmas as float32.
    """
    epsilon_s, sigma_min, sigma_max = 1e-3, 0.002, 80
    log_lo = torch.tensor(numpy.log((torch.tensor(sigma_min) ** 2 + 1).numpy()))  # float32
    log_hi = torch.tensor(numpy.log(numpy.float64(sigma_max**2 + 1)), dtype=torch.float64)
    beta_d = 2 * ((log_lo / epsilon_s).double() - log_hi) / (epsilon_s - 1)
    beta_min = log_hi - 0.5 * beta_d
    t = ((beta_min**2 + 2 * beta_d * (sigmas**2 + 1).log()).sqrt() - beta_min) / beta_d
    return t, beta_min, beta_d + beta_min


def _deis_integrand(beta_0: Tensor, beta_1: Tensor, taus: Tensor) -> Tensor:
    """-(1/2) dlog(alpha)/dt / sqrt(alpha (1 - alpha)) for alpha(t) = exp(-t^2 (beta_1 - beta_0) / 2 - t beta_0);
    the derivative is taken by autograd, as the reference does, so that its float32 rounding matches."""
    with torch.inference_mode(False), torch.enable_grad():
        taus = taus.clone().requires_grad_(True)
        alpha = torch.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)
        alpha.log().sum().backward()
    alpha = alpha.detach()
    return -0.5 * taus.grad / torch.sqrt(alpha * (1 - alpha))


def deis_coefficients(sigmas: Tensor, max_order: int, n_points: int = 10000) -> list[list[Tensor]]:
    """DEIS 'tab' coefficients (Zhang & Chen 2023): for each step, the integral over [t_i, t_i+1] (VP time) of the
    exponential-integrator weight times each Lagrange basis polynomial through the last `order` times, as a
    Riemann sum of n_points. Computed on the CPU from the float32 sigmas, as 0-dim float32 tensors."""
    t_steps, beta_0, beta_1 = _edm_to_vp_time(sigmas.detach().cpu())
    coefficients: list[list[Tensor]] = []
    for i in range(len(t_steps) - 1):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        order = min(i + 1, max_order)
        if order == 1:
            coefficients.append([])
            continue
        taus = torch.linspace(t_cur, t_next, n_points)
        dtau = (t_next - t_cur) / n_points
        prev_t = t_steps[[i - k for k in range(order)]]
        integrand = _deis_integrand(beta_0, beta_1, taus)
        step = []
        for j in range(order):
            poly = 1
            for k in range(order):
                if k != j:
                    poly = poly * ((taus - prev_t[k]) / (prev_t[j] - prev_t[k]))
            step.append(torch.sum(integrand * poly) * dtau)
        coefficients.append(step)
    return coefficients


@torch.no_grad()
def sample_deis(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, max_order: int = 3, deis_mode: str = "tab",
) -> Tensor:
    """DEIS multistep exponential integrator ('tab' coefficients) in sigma; Euler on the step to sigma = 0."""
    if deis_mode != "tab":
        raise ValueError(f"deis_mode {deis_mode!r} is not supported; use 'tab' (ComfyUI's default)")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    host = _host(sigmas).tolist()
    coefficients = deis_coefficients(sigmas, max_order)
    buffer: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t_cur * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        d_cur = (x - denoised) / t_cur
        order = 1 if host[i + 1] <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        else:
            coeffs = coefficients[i]
            x_next = x + coeffs[0] * d_cur
            for k in range(1, order):
                x_next = x_next + coeffs[k] * buffer[-k]
        _shift_in(buffer, d_cur, max_order)
        x = x_next
    return x


# ----------------------------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023), multistep B(h) variants, as ComfyUI configures it
# ----------------------------------------------------------------------------------------------------------------


def _vp_log_alpha(sigma: Tensor) -> Tensor:
    """log alpha_t of the VP process whose noise-to-signal ratio is sigma."""
    return 0.5 * torch.log(1 / ((sigma * sigma) + 1))


def _vp_alpha(sigma: Tensor) -> Tensor:
    return torch.exp(_vp_log_alpha(sigma))


def _vp_std(sigma: Tensor) -> Tensor:
    return torch.sqrt(1.0 - torch.exp(2.0 * _vp_log_alpha(sigma)))


def _vp_lambda(sigma: Tensor) -> Tensor:
    log_alpha = _vp_log_alpha(sigma)
    return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


def _unipc_b(hh: float, order: int, variant: str) -> list[float]:
    """The right-hand side b_i = (i-1)! phi_i(h) / B(h) of UniPC's order conditions, in float64 because its terms
    nearly cancel for small h (ComfyUI computes them so, on the CPU)."""
    hh64 = torch.tensor(hh, dtype=torch.float64)
    h_phi_k = torch.expm1(hh64) / hh64 - 1
    b_h = hh64 if variant == "bh1" else torch.expm1(hh64)
    b = []
    factorial_i = 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh64 - 1 / factorial_i
    return b


def _unipc_update(
    x0_at: Callable[[Tensor, Tensor], Tensor], x: Tensor, model_prev: list[Tensor], t_prev: list[Tensor],
    t: Tensor, host_t: tuple[Tensor, Tensor], order: int, use_corrector: bool, variant: str,
) -> tuple[Tensor, Tensor | None]:
    """One UniP step of the given order to time t (VP sigma), then the UniC correction with the model value at
    the predicted point when `use_corrector`; returns the new x and that model value (None without corrector)."""

    def expand(v: Tensor) -> Tensor:
        return append_dims(v, x.ndim)  # (B,) -> (B, 1, 1, 1)

    lambda_prev_0 = _vp_lambda(t_prev[-1])
    lambda_t = _vp_lambda(t)
    model_prev_0 = model_prev[-1]
    sigma_prev_0, sigma_t = _vp_std(t_prev[-1]), _vp_std(t)
    alpha_t = torch.exp(_vp_log_alpha(t))
    h = lambda_t - lambda_prev_0

    rks, d1s = [], []
    for i in range(1, order):
        rk = ((_vp_lambda(t_prev[-(i + 1)]) - lambda_prev_0) / h)[0]
        rks.append(rk)
        d1s.append((model_prev[-(i + 1)] - model_prev_0) / rk)
    rks = torch.stack(rks + [torch.ones_like(h[0])])

    hh = -h[0]  # data prediction integrates in -lambda
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    r = torch.stack([torch.pow(rks, i - 1) for i in range(1, order + 1)])
    if hh.device.type == "cpu":
        hh_host = float(hh)
    else:  # the same float32 arithmetic on the CPU copy of the two sigmas, to keep the device queue flowing
        hh_host = float(-(_vp_lambda(host_t[0]) - _vp_lambda(host_t[1])))
    b = torch.stack(_unipc_b(hh_host, order, variant)).to(device=x.device, dtype=hh.dtype)

    d1s_t = torch.stack(d1s, dim=1) if d1s else None  # (B, K, C, H, W)
    use_predictor = d1s_t is not None
    # solve_ex: the same LU solve as linalg.solve, without the singularity check that would wait on the device.
    half = torch.tensor([0.5], device=x.device, dtype=b.dtype)
    if use_predictor:
        rhos_p = half if order == 2 else torch.linalg.solve_ex(r[:-1, :-1], b[:-1])[0]
    if use_corrector:
        rhos_c = half if order == 1 else torch.linalg.solve_ex(r, b)[0]

    x_t_ = expand(sigma_t / sigma_prev_0) * x - expand(alpha_t * h_phi_1) * model_prev_0
    pred_res = torch.tensordot(d1s_t, rhos_p, dims=([1], [0])) if use_predictor else 0
    x_t = x_t_ - expand(alpha_t * b_h) * pred_res
    model_t = None
    if use_corrector:
        model_t = x0_at(x_t, t)
        corr_res = torch.tensordot(d1s_t, rhos_c[:-1], dims=([1], [0])) if d1s_t is not None else 0
        d1_t = model_t - model_prev_0
        x_t = x_t_ - expand(alpha_t * b_h) * (corr_res + rhos_c[-1] * d1_t)
    return x_t, model_t


@torch.no_grad()
def sample_uni_pc(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None, variant: str = "bh1",
) -> Tensor:
    """UniPC multistep predictor-corrector of order min(3, steps - 1) with lower orders at the start and the end,
    data prediction, B(h) = h ('bh1') or e^h - 1 ('bh2'); the last step skips the corrector.

    As in ComfyUI, the time variable is sigma itself mapped to a VP process, a final sigma of 0 is replaced by
    0.001, and x is moved to the VP scale and back. One step (two sigmas) returns the rescaled input unchanged.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    extra_args = {} if extra_args is None else extra_args
    timesteps = sigmas.clone()
    host = _host(sigmas).clone()
    if float(host[-1]) == 0:
        timesteps[-1] = 0.001
        host[-1] = 0.001
    batch = x.shape[0]

    def x0_at(x_vp: Tensor, t_vec: Tensor) -> Tensor:
        """The data prediction at VP state x_vp: the denoiser sees the VE state x_vp * sqrt(sigma^2 + 1)."""
        sigma = t_vec.view(t_vec.shape[:1] + (1,) * (x_vp.ndim - 1))
        x_ve = x_vp * ((sigma**2 + 1.0) ** 0.5)
        eps = (x_ve - model(x_ve, t_vec, **extra_args)) / sigma
        return (x_vp - append_dims(_vp_std(t_vec), x_vp.ndim) * eps) / append_dims(_vp_alpha(t_vec), x_vp.ndim)

    x = x / torch.sqrt(1.0 + timesteps[0] ** 2.0)
    steps = len(timesteps) - 1
    order = min(3, len(timesteps) - 2)
    model_prev: list[Tensor] = []
    t_prev: list[Tensor] = []
    idx_prev: list[int] = []

    def update(x: Tensor, k: int, step_order: int, use_corrector: bool) -> tuple[Tensor, Tensor | None]:
        t_vec = timesteps[k].expand(batch)
        host_t = (host[k], host[idx_prev[-1]])
        return _unipc_update(x0_at, x, model_prev, t_prev, t_vec, host_t, step_order, use_corrector, variant)

    for step_index in range(steps):
        if step_index == 0:
            t_vec = timesteps[0].expand(batch)
            model_prev, t_prev, idx_prev = [x0_at(x, t_vec)], [t_vec], [0]
        elif step_index < order:
            x, model_x = update(x, step_index, step_index, use_corrector=True)
            t_vec = timesteps[step_index].expand(batch)
            model_prev.append(model_x if model_x is not None else x0_at(x, t_vec))
            t_prev.append(t_vec)
            idx_prev.append(step_index)
        else:
            final = step_index == steps - 1
            for step in range(step_index, step_index + 1 + int(final)):
                step_order = min(order, steps + 1 - step)
                x, model_x = update(x, step, step_order, use_corrector=step != steps)
                # Slide the history window of length `order`, newest last.
                model_prev[: order - 1] = model_prev[1:order]
                t_prev[: order - 1] = t_prev[1:order]
                idx_prev[: order - 1] = idx_prev[1:order]
                t_vec = timesteps[step].expand(batch)
                t_prev[-1], idx_prev[-1] = t_vec, step
                if step < steps:
                    model_prev[-1] = model_x if model_x is not None else x0_at(x, t_vec)
        if callback is not None:
            callback({"x": x, "i": step_index, "denoised": model_prev[-1], "sigma": sigmas[step_index],
                      "sigma_hat": sigmas[step_index]})
    return x / _vp_alpha(timesteps[-1])


def sample_uni_pc_bh2(
    model: Model, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None, callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """UniPC with B(h) = e^h - 1."""
    return sample_uni_pc(model, x, sigmas, extra_args=extra_args, callback=callback, variant="bh2")


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------

# ComfyUI's KSampler sampler names served here, in its list order.
SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "heunpp2": sample_heunpp2,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_gpu": sample_dpmpp_sde_gpu,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": sample_dpmpp_2m_sde_gpu,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": sample_dpmpp_3m_sde_gpu,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "deis": sample_deis,
    "ddim": sample_ddim,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}
SAMPLER_NAMES: list[str] = list(SAMPLERS)


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler function for a ComfyUI sampler name."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLER_NAMES}") from None
