"""The MODEL a prompt passes between nodes: a handle to the resident UNet with its sampling parameterisation,
latent format and patches, and the translation of ComfyUI CONDITIONING into what the UNet takes (cross-attention
context, for SDXL the vector `y` of pooled text embedding plus size and crop embeddings, and for inpainting models
the channels concatenated to the latent).

Run it inside `active()`, which keeps the UNet loaded and patched for the block:

    with model.active():
        denoised = model(x, sigma, cross_attn, y)

A call outside `active()` makes the UNet active for that call only (correct, but it takes the cache's lock on
every step).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from engine.handles import ActiveSlot, activate
from engine.inpaint import cond_options_to_fields
from engine.models.unet import UNetConfig, UNetModel, timestep_embedding
from engine.patching import PatchSet
from engine.residency import Resident
from engine.sampling.guidance import Cond
from engine.sampling.model_sampling import LatentFormat, ModelSampling

Conditioning = list[list[Any]]  # [[tensor [B, T, D], {"pooled_output": ..., ...}], ...]


@dataclass(frozen=True, eq=False)
class DiffusionModel:
    resident: Resident  # value: UNetModel; a UNetModel itself is accepted and kept as it is
    sampling: ModelSampling
    latent_format: LatentFormat
    family: str  # sd1, sd2, sdxl, sdxl_refiner
    options: dict[str, Any] = field(default_factory=dict)  # options added by later nodes
    patches: tuple[PatchSet, ...] = ()  # LoRA and the like, applied in this order inside `active()`
    config: UNetConfig | None = None  # the UNet's configuration (input channels), known without loading it
    _active: ActiveSlot = field(default_factory=ActiveSlot, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.resident, nn.Module):
            unet = self.resident
            object.__setattr__(self, "resident", Resident.fixed(unet, [unet], "unet"))
            if self.config is None:
                object.__setattr__(self, "config", getattr(unet, "config", None))

    # -- the network ------------------------------------------------------------------------------------------
    def active(self) -> AbstractContextManager[UNetModel]:
        """The UNet, loaded, pinned and patched with this handle's patches for the duration of the block."""
        return activate(self._active, self.resident, lambda unet: {"unet": unet}, self.patches)

    def with_patches(self, *patch_sets: PatchSet) -> DiffusionModel:
        """A new handle over the same weights with `patch_sets` added after this one's."""
        return replace(self, patches=self.patches + tuple(patch_sets))

    @property
    def unet(self) -> UNetModel:
        """The UNet as it is now (loaded if it was evicted; not pinned; with whatever patches were applied last):
        for inspection. Run it through `active()`."""
        with self.resident.use() as unet:
            return unet

    @property
    def device(self) -> torch.device:
        return self.resident.device

    @property
    def dtype(self) -> torch.dtype:
        return self.resident.dtype

    @property
    def in_channels(self) -> int:
        return self.config.in_channels if self.config is not None else self.latent_format.latent_channels

    # -- ComfyUI's apply_model --------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cross_attn: torch.Tensor, y: torch.Tensor | None,
                 concat: torch.Tensor | None = None) -> torch.Tensor:
        """Denoised prediction for noisy latents `x` at noise levels `sigma`; `concat` (ComfyUI's c_concat) is
        appended to the scaled model input along channels."""
        unet = self._active.get()
        if unet is None:
            with self.active() as unet:
                return self._apply(unet, x, sigma, cross_attn, y, concat)
        return self._apply(unet, x, sigma, cross_attn, y, concat)

    def _apply(self, unet: UNetModel, x: torch.Tensor, sigma: torch.Tensor, cross_attn: torch.Tensor,
               y: torch.Tensor | None, concat: torch.Tensor | None) -> torch.Tensor:
        dtype = self.dtype
        model_input = self.sampling.calculate_input(sigma, x)
        if concat is not None:  # in the input's dtype first, then everything in the model's, as ComfyUI
            model_input = torch.cat([model_input, concat.to(device=model_input.device, dtype=model_input.dtype)], 1)
        timesteps = self.sampling.timestep(sigma).float()
        output = unet(model_input.to(dtype), timesteps, cross_attn.to(dtype), None if y is None else y.to(dtype))
        return self.sampling.calculate_denoised(sigma, output.float(), x)

    # -- CONDITIONING -> Cond ---------------------------------------------------------------------------------
    def conds(self, conditioning: Conditioning, latent: torch.Tensor, prompt_type: str,
              noise_mask: torch.Tensor | None = None) -> list[Cond]:
        """CONDITIONING entries as guidance inputs on the model's device; `prompt_type` is positive/negative,
        `latent` the raw input latent and `noise_mask` the LATENT's noise mask (inpainting models read both)."""
        device = self.device
        out = []
        for tensor, options in conditioning:
            y = self._vector(options, latent, prompt_type)
            fields = self._fields(options, latent, noise_mask)
            out.append(Cond(cross_attn=tensor.to(device), y=None if y is None else y.to(device), **fields))
        return out

    def _fields(self, options: dict[str, Any], latent: torch.Tensor, noise_mask: torch.Tensor | None) -> dict:
        """Areas, masks, strength, timestep ranges and, for an inpainting UNet (one that takes more input channels
        than the latent has), the concat channels: `engine.inpaint.cond_options_to_fields`."""
        return cond_options_to_fields(options, latent, self.sampling, latent_format=self.latent_format,
                                      noise_mask=noise_mask, inpaint_model=self.in_channels > latent.shape[1],
                                      device=self.device)

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
