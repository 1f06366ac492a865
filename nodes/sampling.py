"""KSampler and KSamplerAdvanced: ComfyUI's sampling nodes over `engine.sampling.ksampler`."""
from __future__ import annotations

import torch

from engine.context import NodeContext
from engine.diffusion import DiffusionModel
from engine.sampling import ksampler
from engine.sampling.samplers import SAMPLER_NAMES
from engine.sampling.schedules import SCHEDULER_NAMES

MAX_SEED = 0xFFFFFFFFFFFFFFFF


def common_ksampler(model: DiffusionModel, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                    positive: list, negative: list, latent: dict, context: NodeContext, denoise: float = 1.0,
                    add_noise: bool = True, start_step: int | None = None, last_step: int | None = None,
                    force_full_denoise: bool = False) -> tuple[dict]:
    samples = latent["samples"]
    noise_mask = latent.get("noise_mask")

    def callback(step: dict) -> None:
        context.report_progress(step["i"] + 1, steps)

    with model.active():  # loaded, pinned and patched (LoRA) for the whole sampling loop
        result = ksampler.sample(
            model, model.sampling, model.latent_format,
            model.conds(positive, samples, "positive", noise_mask=noise_mask),
            model.conds(negative, samples, "negative", noise_mask=noise_mask),
            samples.to(model.device), seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
            scheduler=scheduler, denoise=denoise, add_noise=add_noise, start_step=start_step, last_step=last_step,
            force_full_denoise=force_full_denoise, batch_index=latent.get("batch_index"), callback=callback,
            noise_mask=noise_mask)
    return ({**latent, "samples": result.to(torch.device("cpu"), torch.float32)},)


class KSampler:
    CATEGORY = "sampling"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    DESCRIPTION = "Uses the provided model, positive and negative conditioning to denoise the latent image."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (SAMPLER_NAMES,),
            "scheduler": (SCHEDULER_NAMES,),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }, "hidden": {"context": "CONTEXT"}}

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               context: NodeContext, denoise=1.0):
        return common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                               context, denoise=denoise)


class KSamplerAdvanced:
    CATEGORY = "sampling"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "add_noise": (["enable", "disable"],),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (SAMPLER_NAMES,),
            "scheduler": (SCHEDULER_NAMES,),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
            "return_with_leftover_noise": (["disable", "enable"],),
        }, "hidden": {"context": "CONTEXT"}}

    def sample(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
               latent_image, start_at_step, end_at_step, return_with_leftover_noise, context: NodeContext):
        return common_ksampler(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent_image, context, add_noise=add_noise == "enable", start_step=start_at_step,
                               last_step=end_at_step,
                               force_full_denoise=return_with_leftover_noise != "enable")


NODE_CLASS_MAPPINGS = {"KSampler": KSampler, "KSamplerAdvanced": KSamplerAdvanced}
NODE_DISPLAY_NAME_MAPPINGS = {"KSampler": "KSampler", "KSamplerAdvanced": "KSampler (Advanced)"}
