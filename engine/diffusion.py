"""The MODEL a prompt passes between nodes: the UNet with its sampling parameterisation and latent format, and
the translation of ComfyUI CONDITIONING into what the UNet takes (cross-attention context and, for SDXL, the
vector `y` of pooled text embedding plus size and crop embeddings)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.models.unet import UNetModel, timestep_embedding
from engine.sampling.guidance import Cond
from engine.sampling.model_sampling import LatentFormat, ModelSampling

Conditioning = list[list[Any]]  # [[tensor [B, T, D], {"pooled_output": ..., ...}], ...]


@dataclass
class DiffusionModel:
    unet: UNetModel
    sampling: ModelSampling
    latent_format: LatentFormat
    family: str  # sd1, sd2, sdxl, sdxl_refiner
    options: dict[str, Any] = field(default_factory=dict)  # patches and options added by later nodes

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cross_attn: torch.Tensor,
                 y: torch.Tensor | None) -> torch.Tensor:
        """Denoised prediction for noisy latents `x` at noise levels `sigma` (ComfyUI's apply_model)."""
        dtype = self.dtype
        model_input = self.sampling.calculate_input(sigma, x).to(dtype)
        timesteps = self.sampling.timestep(sigma).float()
        output = self.unet(model_input, timesteps, cross_attn.to(dtype), None if y is None else y.to(dtype))
        return self.sampling.calculate_denoised(sigma, output.float(), x)

    def conds(self, conditioning: Conditioning, latent: torch.Tensor, prompt_type: str) -> list[Cond]:
        """CONDITIONING entries as guidance inputs on the model's device; `prompt_type` is positive/negative."""
        device = self.device
        out = []
        for tensor, options in conditioning:
            y = self._vector(options, latent, prompt_type)
            out.append(Cond(cross_attn=tensor.to(device), y=None if y is None else y.to(device)))
        return out

    def _vector(self, options: dict[str, Any], latent: torch.Tensor, prompt_type: str) -> torch.Tensor | None:
        """SDXL's label-embedding input: pooled text embedding + Fourier embeddings of the size/crop parameters
        (and the refiner's aesthetic score), width and height defaulting to the latent's size in pixels."""
        if self.family not in ("sdxl", "sdxl_refiner"):
            return None
        pooled = options.get("pooled_output")
        if pooled is None:
            raise ValueError("SDXL conditioning needs a pooled text embedding; encode the prompt with this "
                             "checkpoint's CLIP")
        width = options.get("width", latent.shape[-1] * 8)
        height = options.get("height", latent.shape[-2] * 8)
        values = [height, width, options.get("crop_h", 0), options.get("crop_w", 0)]
        if self.family == "sdxl":
            values += [options.get("target_height", height), options.get("target_width", width)]
        else:
            default_score = 2.5 if prompt_type == "negative" else 6.0
            values.append(options.get("aesthetic_score", default_score))
        embedded = timestep_embedding(torch.tensor(values, dtype=torch.float32), 256)  # (n, 256)
        flat = embedded.flatten().unsqueeze(0).repeat(pooled.shape[0], 1)
        return torch.cat((pooled.float().cpu(), flat), dim=1)
