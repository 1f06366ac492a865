"""The discrete noise schedule of SD1.x/2.x/SDXL and the eps / v-prediction parameterisations, as ComfyUI has them.

Scope: ComfyUI's `ModelSamplingDiscrete` combined with `EPS` or `V_PREDICTION` (comfy/model_sampling.py), the
latent scale factors of its `LatentFormat` classes (comfy/latent_formats.py), and the denoiser wrapper that turns
a noise- or velocity-predicting network into the `model(x, sigma, ...) -> denoised` function samplers call
(ComfyUI's `BaseModel._apply_model`). Samplers never see the parameterisation: they only see denoised outputs.

References:
- Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (the linear beta schedule).
- Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (the sigma view:
  x = x0 + sigma * eps, c_in = 1 / sqrt(sigma^2 + sigma_data^2)).
- Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models" (v-prediction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

Prediction = Literal["eps", "v"]
Denoiser = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


def _per_sample(sigma: Tensor, ndim: int) -> Tensor:
    """Broadcast a sigma of one element, or one per batch item, against a tensor of `ndim` dimensions."""
    if sigma.nelement() == 1:
        return sigma.view(())
    return sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


class ModelSampling:
    """The 1000-step discrete VP schedule seen as sigmas, plus the model parameterisation.

    The sigma table is computed in float64 (betas = linspace(sqrt(start), sqrt(end))^2, as ComfyUI's
    `make_beta_schedule("linear")`) and stored as float32, as ComfyUI stores it; `log_sigmas` is the float64 log
    rounded to float32. Tables live on the CPU until `to(device)` returns a copy elsewhere.
    """

    def __init__(
        self,
        prediction: Prediction = "eps",
        linear_start: float = 0.00085,  # beta_1 of SD's training schedule
        linear_end: float = 0.012,  # beta_T
        timesteps: int = 1000,  # training steps
        sigma_data: float = 1.0,  # data standard deviation in the Karras preconditioning
    ) -> None:
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.prediction = prediction
        self.linear_start = linear_start
        self.linear_end = linear_end
        self.num_timesteps = timesteps
        self.sigma_data = sigma_data
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    def to(self, device: torch.device | str) -> ModelSampling:
        """A copy whose tables live on `device`, so timestep lookups inside the sampling loop stay there."""
        moved = object.__new__(ModelSampling)
        moved.__dict__.update(self.__dict__)
        moved.sigmas = self.sigmas.to(device)
        moved.log_sigmas = self.log_sigmas.to(device)
        return moved

    @property
    def sigma_min(self) -> Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: Tensor) -> Tensor:
        """The nearest discrete timestep in log-sigma distance (ComfyUI's rounding, not interpolation)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        dists = sigma.log() - log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep: Tensor) -> Tensor:
        """Sigma at a possibly fractional timestep, interpolating linearly in log sigma."""
        log_sigmas = self.log_sigmas.to(timestep.device)
        t = torch.clamp(timestep.float(), min=0, max=len(log_sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the way through sampling (0 = start, 1 = end), used by timestep ranges."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()

    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        """Karras c_in: scale x = x0 + sigma * eps back to unit variance before the network."""
        sigma = _per_sample(sigma, x.ndim)
        return x / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        """The x0 estimate from the network output (noise for eps, velocity for v)."""
        sigma = _per_sample(sigma, model_output.ndim)
        if self.prediction == "eps":
            return x - model_output * sigma
        sd = self.sigma_data
        return x * sd**2 / (sigma**2 + sd**2) - model_output * sigma * sd / (sigma**2 + sd**2) ** 0.5

    def noise_scaling(self, sigma: Tensor, noise: Tensor, latent: Tensor, max_denoise: bool = False) -> Tensor:
        """The sampler's starting point: latent + sigma * noise.

        At (or above) the top of the schedule ComfyUI scales by sqrt(1 + sigma^2) instead, so that pure noise
        has the variance the VP forward process gives it.
        """
        sigma = _per_sample(sigma, noise.ndim)
        if max_denoise:
            noise = noise * torch.sqrt(1.0 + sigma**2.0)
        else:
            noise = noise * sigma
        return noise + latent

    def inverse_noise_scaling(self, sigma: Tensor, latent: Tensor) -> Tensor:
        """Identity for eps and v: the sampler output is already the latent."""
        return latent


def make_denoiser(network: Callable[..., Tensor], model_sampling: ModelSampling, dtype: torch.dtype) -> Denoiser:
    """Wrap a network `network(x, t, context=..., y=...)` into `model_fn(x, sigma, cross_attn, y) -> denoised`.

    As ComfyUI's `BaseModel._apply_model`: the input is scaled by c_in and cast to the network's dtype, the
    network gets the nearest discrete timestep as float, and its output is cast back to float32 before the
    x0 estimate is formed against the uncast x.
    """

    def model_fn(x: Tensor, sigma: Tensor, cross_attn: Tensor, y: Tensor | None) -> Tensor:
        xc = model_sampling.calculate_input(sigma, x).to(dtype)
        t = model_sampling.timestep(sigma).float()
        context = cross_attn.to(device=xc.device, dtype=dtype)
        y = None if y is None else y.to(device=xc.device, dtype=dtype)
        out = network(xc, t, context=context, y=y)
        return model_sampling.calculate_denoised(sigma, out.float(), x)

    return model_fn


@dataclass(frozen=True)
class LatentFormat:
    """How raw VAE latents are scaled for the diffusion model (applied by the sampler, not by VAE nodes)."""

    scale_factor: float = 1.0
    latent_channels: int = 4

    def process_in(self, latent: Tensor) -> Tensor:
        return latent * self.scale_factor

    def process_out(self, latent: Tensor) -> Tensor:
        return latent / self.scale_factor


SD15_LATENT = LatentFormat(scale_factor=0.18215)  # also SD2.x
SDXL_LATENT = LatentFormat(scale_factor=0.13025)


def is_max_denoise(model_sampling: ModelSampling, first_sigma: float) -> bool:
    """ComfyUI's rule for starting from pure noise: the first sigma is at or above the schedule's top."""
    sigma_max = float(model_sampling.sigma_max)
    return math.isclose(sigma_max, first_sigma, rel_tol=1e-05) or first_sigma > sigma_max
