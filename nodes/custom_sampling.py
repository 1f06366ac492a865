"""The custom-sampling nodes API users script: sampler, schedule, guider and noise as separate values (types
SAMPLER, SIGMAS, GUIDER, NOISE) put together by SamplerCustom / SamplerCustomAdvanced, as ComfyUI's
comfy_extras/nodes_custom_sampler.py has them.

SamplerCustom with BasicScheduler and KSamplerSelect runs exactly what KSampler runs (the same noise, schedule,
guidance and sampler); both sampler nodes also return the last step's denoised prediction ("denoised_output").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.context import NodeContext
from engine.sampling import ksampler
from engine.sampling.samplers import SAMPLER_NAMES
from engine.sampling.schedules import SCHEDULER_NAMES, get_sigmas_exponential, get_sigmas_karras, scheduler_sigmas

MAX_SEED = 0xFFFFFFFFFFFFFFFF
SIGMA_MAX, SIGMA_MIN = 14.614642, 0.0291675  # SD's discrete schedule, ComfyUI's defaults for the closed forms


@dataclass(frozen=True)
class Sampler:
    """A SAMPLER: a sampler name from the KSampler list and its keyword options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Noise:
    """A NOISE: seeded Gaussian noise like a LATENT (KSampler's draw), or zeros when `seed` is None."""

    seed: int | None

    def generate(self, latent: dict) -> torch.Tensor:
        samples = latent["samples"]
        if self.seed is None:
            return torch.zeros(samples.shape, dtype=samples.dtype, layout=samples.layout, device="cpu")
        return ksampler.prepare_noise(samples, self.seed, latent.get("batch_index"))

    @property
    def sampler_seed(self) -> int:
        """The seed the sampler's own randomness starts from (ComfyUI's disabled noise has seed 0)."""
        return 0 if self.seed is None else self.seed


@dataclass(frozen=True)
class Guider:
    """A GUIDER: a model with its conditioning and cfg (no negative: the positive alone, cfg 1)."""

    model: Any
    positive: list
    negative: list | None = None
    cfg: float = 1.0


def sample(guider: Guider, sampler: Sampler, sigmas: torch.Tensor, latent: dict, noise: torch.Tensor, seed: int,
           context: NodeContext) -> tuple[dict, dict]:
    """Run a guider's model along `sigmas` from `latent` with `noise`: (output, denoised_output) LATENTs."""
    model = guider.model
    samples = latent["samples"]
    noise_mask = latent.get("noise_mask")
    steps = sigmas.shape[-1] - 1
    last = {}

    def callback(step: dict) -> None:
        last["denoised"] = step["denoised"]
        context.report_progress(step["i"] + 1, steps)

    with model.active():
        positive = model.conds(guider.positive, samples, "positive", noise_mask=noise_mask)
        negative = model.conds(guider.negative or [], samples, "negative", noise_mask=noise_mask)
        result = ksampler.sample_custom(
            model, model.sampling, model.latent_format, positive, negative, samples.to(model.device),
            sampler=sampler.name, sampler_options=sampler.options, sigmas=sigmas, cfg=guider.cfg, noise=noise,
            seed=seed, callback=callback, noise_mask=noise_mask)
    output = {**latent, "samples": result.to(torch.device("cpu"), torch.float32)}
    if "denoised" not in last:
        return output, output
    return output, {**latent, "samples": model.latent_format.process_out(last["denoised"].cpu())}


class SamplerCustom:
    CATEGORY = "sampling/custom_sampling"
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "add_noise": ("BOOLEAN", {"default": True}),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "sampler": ("SAMPLER",),
            "sigmas": ("SIGMAS",),
            "latent_image": ("LATENT",),
        }, "hidden": {"context": "CONTEXT"}}

    def sample(self, model, add_noise, noise_seed, cfg, positive, negative, sampler, sigmas, latent_image,
               context: NodeContext):
        noise = Noise(noise_seed if add_noise else None)
        return sample(Guider(model, positive, negative, cfg), sampler, sigmas, latent_image,
                      noise.generate(latent_image), noise_seed, context)


class SamplerCustomAdvanced:
    CATEGORY = "sampling/custom_sampling"
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"noise": ("NOISE",), "guider": ("GUIDER",), "sampler": ("SAMPLER",),
                             "sigmas": ("SIGMAS",), "latent_image": ("LATENT",)},
                "hidden": {"context": "CONTEXT"}}

    def sample(self, noise, guider, sampler, sigmas, latent_image, context: NodeContext):
        return sample(guider, sampler, sigmas, latent_image, noise.generate(latent_image), noise.sampler_seed,
                      context)


class KSamplerSelect:
    CATEGORY = "sampling/custom_sampling/samplers"
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sampler_name": (SAMPLER_NAMES,)}}

    def get_sampler(self, sampler_name):
        return (Sampler(sampler_name),)


class BasicScheduler:
    CATEGORY = "sampling/custom_sampling/schedulers"
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "scheduler": (SCHEDULER_NAMES,),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    def get_sigmas(self, model, scheduler, steps, denoise):
        total_steps = steps
        if denoise < 1.0:
            if denoise <= 0.0:
                return (torch.zeros(0, dtype=torch.float32),)
            total_steps = int(steps / denoise)  # partial denoise: the tail of a longer schedule
        return (scheduler_sigmas(model.sampling, scheduler, total_steps).cpu()[-(steps + 1):],)


def _closed_form_inputs(**extra: tuple) -> dict:
    sigma = {"min": 0.0, "max": 5000.0, "step": 0.01, "round": False}
    return {"required": {
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
        "sigma_max": ("FLOAT", {"default": SIGMA_MAX, **sigma}),
        "sigma_min": ("FLOAT", {"default": SIGMA_MIN, **sigma}),
        **extra,
    }}


class KarrasScheduler:
    CATEGORY = "sampling/custom_sampling/schedulers"
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return _closed_form_inputs(rho=("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                                  "round": False}))

    def get_sigmas(self, steps, sigma_max, sigma_min, rho):
        return (get_sigmas_karras(n=steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho),)


class ExponentialScheduler:
    CATEGORY = "sampling/custom_sampling/schedulers"
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return _closed_form_inputs()

    def get_sigmas(self, steps, sigma_max, sigma_min):
        return (get_sigmas_exponential(n=steps, sigma_min=sigma_min, sigma_max=sigma_max),)


class SplitSigmas:
    CATEGORY = "sampling/custom_sampling/sigmas"
    RETURN_TYPES = ("SIGMAS", "SIGMAS")
    RETURN_NAMES = ("high_sigmas", "low_sigmas")
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sigmas": ("SIGMAS",), "step": ("INT", {"default": 0, "min": 0, "max": 10000})}}

    def get_sigmas(self, sigmas, step):
        # the step's sigma ends the first part and starts the second, so the two chain without a gap
        return (sigmas[:step + 1], sigmas[step:])


class CFGGuider:
    CATEGORY = "sampling/custom_sampling/guiders"
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        }}

    def get_guider(self, model, positive, negative, cfg):
        return (Guider(model, positive, negative, cfg),)


class BasicGuider:
    CATEGORY = "sampling/custom_sampling/guiders"
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "conditioning": ("CONDITIONING",)}}

    def get_guider(self, model, conditioning):
        return (Guider(model, conditioning),)


class RandomNoise:
    CATEGORY = "sampling/custom_sampling/noise"
    RETURN_TYPES = ("NOISE",)
    FUNCTION = "get_noise"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
        }}

    def get_noise(self, noise_seed):
        return (Noise(noise_seed),)


class DisableNoise:
    CATEGORY = "sampling/custom_sampling/noise"
    RETURN_TYPES = ("NOISE",)
    FUNCTION = "get_noise"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def get_noise(self):
        return (Noise(None),)


NODE_CLASS_MAPPINGS = {
    "SamplerCustom": SamplerCustom,
    "SamplerCustomAdvanced": SamplerCustomAdvanced,
    "KSamplerSelect": KSamplerSelect,
    "BasicScheduler": BasicScheduler,
    "KarrasScheduler": KarrasScheduler,
    "ExponentialScheduler": ExponentialScheduler,
    "SplitSigmas": SplitSigmas,
    "CFGGuider": CFGGuider,
    "BasicGuider": BasicGuider,
    "RandomNoise": RandomNoise,
    "DisableNoise": DisableNoise,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
