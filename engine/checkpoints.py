"""Single-file checkpoints in the original Stable Diffusion layout: reading them, recognising the family from key
names and shapes, and building the networks without holding the weights twice.

Networks are constructed on the `meta` device (no memory, no random initialisation) and then take the file's
tensors with `load_state_dict(..., assign=True)`, each tensor moved to the device and dtype once.

Families (the key prefixes of the original checkpoints):
- SD1.x: `model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.` (CLIP ViT-L, HF layout)
- SD2.x: `cond_stage_model.model.` (OpenCLIP ViT-H); v-prediction when the UNet's last attention norm says so
- SDXL base: `conditioner.embedders.0.transformer.` (CLIP ViT-L) and `conditioner.embedders.1.model.` (bigG)
- SDXL refiner: `conditioner.embedders.0.model.` (bigG only), 2560 label-embedding inputs
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from engine.devices import DevicePolicy
from engine.errors import BadRequest
from engine.models.clip import ClipCheckpointError, CLIPTextModel, load_clip
from engine.models.unet import UNetCheckpointError, UNetConfig, UNetModel, detect_unet_config, load_unet
from engine.models.vae import AutoencoderKL, VAEWeightsError, load_vae
from engine.sampling.model_sampling import SD15_LATENT, SDXL_LATENT, LatentFormat, ModelSampling
from engine.weightfile import WeightFile, WeightFileError

log = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
V_PREDICTION_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


class CheckpointError(BadRequest):
    """The file is not a checkpoint this service can run; the message names the file and what it holds."""


@dataclass(frozen=True)
class Family:
    name: str  # sd1, sd2, sdxl, sdxl_refiner
    clip_prefixes: tuple[str, ...]  # text encoders, in the order the TextEncoder takes them
    latent_format: LatentFormat
    prediction: str = "eps"


def read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """The tensors of a `.safetensors` file (memory-mapped, read on use), or of a pickled `.ckpt`/`.pt` read with
    `weights_only=True`."""
    try:
        if path.suffix.lower() in (".safetensors", ".sft"):
            return WeightFile(path)
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # safetensors and pickle raise many types for a damaged or foreign file
        raise CheckpointError(f"{path.name} could not be read as a model file: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} holds a {type(data).__name__}, not a dictionary of tensors")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def detect_family(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> tuple[Family, UNetConfig]:
    if not any(key.startswith(UNET_PREFIX) for key in sd):
        raise CheckpointError(f"{name} is not a Stable Diffusion checkpoint: it has no `{UNET_PREFIX}*` keys "
                              f"(found e.g. {_sample_keys(sd)})")
    try:
        config = detect_unet_config(sd, UNET_PREFIX)
    except UNetCheckpointError as exc:
        raise CheckpointError(f"{name} has UNet keys but not a UNet this service knows: {exc}") from exc
    if _has(sd, "conditioner.embedders.1.model.") and _has(sd, "conditioner.embedders.0.transformer."):
        family = Family("sdxl", ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
                        SDXL_LATENT)
    elif _has(sd, "conditioner.embedders.0.model."):
        family = Family("sdxl_refiner", ("conditioner.embedders.0.model.",), SDXL_LATENT)
    elif _has(sd, "cond_stage_model.model."):
        probe = sd.get(V_PREDICTION_PROBE)
        v = probe is not None and config.in_channels == 4 and float(probe.float().std(unbiased=False)) > 0.09
        family = Family("sd2", ("cond_stage_model.model.",), SD15_LATENT, "v" if v else "eps")
    elif _has(sd, "cond_stage_model.transformer."):
        family = Family("sd1", ("cond_stage_model.transformer.",), SD15_LATENT)
    else:
        raise CheckpointError(f"{name} has a UNet but no text encoder this service knows "
                              f"(found e.g. {_sample_keys(sd)})")
    return family, config


def _release(sd: Mapping[str, torch.Tensor]) -> None:
    if isinstance(sd, WeightFile):
        sd.release()


def _has(sd: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def _sample_keys(sd: Mapping[str, Any]) -> str:
    keys = sorted(sd)[:3]
    return ", ".join(keys) if keys else "no tensors at all"


@dataclass
class LoadedCheckpoint:
    family: Family
    unet: UNetModel
    text_models: list[CLIPTextModel]
    vae: AutoencoderKL
    model_sampling: ModelSampling


# what the per-network loaders raise for weights of the wrong keys or shapes; the file is then not a checkpoint
# of the family it looked like
_WEIGHT_ERRORS = (UNetCheckpointError, ClipCheckpointError, VAEWeightsError, WeightFileError, ValueError)


def load_checkpoint(path: Path, policy: DevicePolicy) -> LoadedCheckpoint:
    started = time.perf_counter()
    sd = read_state_dict(path)
    family, unet_config = detect_family(sd, path.name)
    try:
        stored = next(v.dtype for k, v in sd.items() if k.startswith(UNET_PREFIX))
        unet = load_unet(sd, UNET_PREFIX, config=unet_config, device=policy.device,
                         dtype=policy.keep_or(stored, policy.unet_dtype))
        _release(sd)  # peak memory: the converted UNet plus the file's UNet pages, never the whole file twice
        # ComfyUI keeps text encoders in float16 and computes in float32 on the CPU: round through float16 to match
        text_models = [load_clip(sd, prefix, device=policy.device, dtype=policy.text_dtype, round_to=torch.float16)
                       for prefix in family.clip_prefixes]
        _release(sd)
        vae = load_vae(sd, VAE_PREFIX, device=policy.device, dtype=policy.vae_dtype)
        _release(sd)
    except _WEIGHT_ERRORS as exc:
        raise CheckpointError(f"{path.name} looks like a {family.name} checkpoint but {exc}") from exc
    del sd
    log.info("loaded %s (%s%s) in %.2f s", path.name, family.name,
             ", v-prediction" if family.prediction == "v" else "", time.perf_counter() - started)
    # the sigma table lives on the device, so that timestep lookups in the sampling loop copy nothing
    return LoadedCheckpoint(family, unet, text_models, vae, ModelSampling(family.prediction).to(policy.device))


def load_vae_file(path: Path, policy: DevicePolicy) -> AutoencoderKL:
    """A standalone VAE file (original or diffusers layout, no prefix), or a checkpoint's VAE."""
    sd = read_state_dict(path)
    prefix = VAE_PREFIX if _has(sd, VAE_PREFIX) else ""
    try:
        return load_vae(sd, prefix, device=policy.device, dtype=policy.vae_dtype)
    except _WEIGHT_ERRORS as exc:
        raise CheckpointError(f"{path.name} is not a VAE this service can load: {exc}") from exc
