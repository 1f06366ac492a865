"""Single-file checkpoints in the original Stable Diffusion layout: reading them, recognising the family from key
names and shapes, building the networks without holding the weights twice, and handing them out as resident
MODEL / CLIP / VAE handles (`open_checkpoint`, `open_vae`).

Networks are constructed on the `meta` device (no memory, no random initialisation) and then take the file's
tensors with `load_state_dict(..., assign=True)`, each tensor moved to the device and dtype once: a float32 file
loaded to the CPU in float32 keeps the memory-mapped pages as its weights (no copy at all). Each network of a
checkpoint (UNet, text encoders, VAE) is a separate resident entry, so an evicted one is read back alone.

Families (the key prefixes of the original checkpoints):
- SD1.x: `model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.` (CLIP ViT-L, HF layout)
- SD2.x: `cond_stage_model.model.` (OpenCLIP ViT-H); v-prediction when the UNet's last attention norm says so
- SDXL base: `conditioner.embedders.0.transformer.` (CLIP ViT-L) and `conditioner.embedders.1.model.` (bigG)
- SDXL refiner: `conditioner.embedders.0.model.` (bigG only), 2560 label-embedding inputs
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from engine.devices import DevicePolicy
from engine.diffusion import DiffusionModel
from engine.errors import BadRequest
from engine.handles import VAEHandle
from engine.modelfiles import ModelFiles
from engine.models.clip import ClipCheckpointError, CLIPTextModel, load_clip
from engine.models.unet import UNetCheckpointError, UNetConfig, UNetModel, detect_unet_config, load_unet
from engine.models.vae import AutoencoderKL, VAEWeightsError, load_vae
from engine.residency import ModelCache, ModelKey, Resident
from engine.sampling.model_sampling import SD15_LATENT, SDXL_LATENT, LatentFormat, ModelSampling
from engine.text.encode import TextEncoder
from engine.text.handle import ClipHandle, build_encoder, embedding_source
from engine.weightfile import WeightFile, WeightFileError

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds, read from its header (and, for SD2, one tensor): enough to name and size its
    networks without loading them."""
    path: Path
    family: Family
    unet_config: UNetConfig
    unet_stored: torch.dtype  # the dtype of the UNet's weights in the file
    sizes: dict[str, int]  # parameters per network: unet, text, vae


def require_vae(info: CheckpointInfo) -> None:
    if info.sizes["vae"] == 0:
        raise CheckpointError(f"{info.path.name} looks like a {info.family.name} checkpoint but has no VAE "
                              f"(`{VAE_PREFIX}*` keys)")


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    sd = read_state_dict(path)
    family, unet_config = detect_family(sd, path.name)
    stored = next(v.dtype for k, v in sd.items() if k.startswith(UNET_PREFIX))
    sizes = {"unet": _count(sd, (UNET_PREFIX,)), "text": _count(sd, family.clip_prefixes),
             "vae": _count(sd, (VAE_PREFIX,))}
    _release(sd)
    return CheckpointInfo(path, family, unet_config, stored, sizes)


def _count(sd: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> int:
    """Elements under the prefixes, from shapes only (a WeightFile reads no data for this)."""
    total = 0
    for key in sd:
        if key.startswith(prefixes):
            shape = sd.shape(key) if isinstance(sd, WeightFile) else tuple(sd[key].shape)
            total += math.prod(shape)
    return total


# what the per-network loaders raise for weights of the wrong keys or shapes; the file is then not a checkpoint
# of the family it looked like
_WEIGHT_ERRORS = (UNetCheckpointError, ClipCheckpointError, VAEWeightsError, WeightFileError, ValueError)


def load_unet_part(info: CheckpointInfo, device: torch.device, dtype: torch.dtype) -> UNetModel:
    sd = read_state_dict(info.path)
    try:
        # peak memory: the converted UNet plus the file's UNet pages, never the whole file twice
        return load_unet(sd, UNET_PREFIX, config=info.unet_config, device=device, dtype=dtype)
    except _WEIGHT_ERRORS as exc:
        raise CheckpointError(f"{info.path.name} looks like a {info.family.name} checkpoint but {exc}") from exc
    finally:
        _release(sd)


def load_text_part(info: CheckpointInfo, device: torch.device, dtype: torch.dtype) -> list[CLIPTextModel]:
    sd = read_state_dict(info.path)
    try:
        # ComfyUI keeps text encoders in float16 and computes in float32 on the CPU: round through float16 to match
        return [load_clip(sd, prefix, device=device, dtype=dtype, round_to=torch.float16)
                for prefix in info.family.clip_prefixes]
    except _WEIGHT_ERRORS as exc:
        raise CheckpointError(f"{info.path.name} looks like a {info.family.name} checkpoint but {exc}") from exc
    finally:
        _release(sd)


def load_vae_part(path: Path, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """The VAE of a checkpoint, or a standalone VAE file (original or diffusers layout, no prefix)."""
    sd = read_state_dict(path)
    prefix = VAE_PREFIX if _has(sd, VAE_PREFIX) else ""
    try:
        return load_vae(sd, prefix, device=device, dtype=dtype)
    except _WEIGHT_ERRORS as exc:
        what = "checkpoint's VAE" if prefix else "VAE this service can load"
        raise CheckpointError(f"{path.name}: not a {what}: {exc}") from exc
    finally:
        _release(sd)


@dataclass
class LoadedCheckpoint:
    family: Family
    unet: UNetModel
    text_models: list[CLIPTextModel]
    vae: AutoencoderKL
    model_sampling: ModelSampling


def load_checkpoint(path: Path, policy: DevicePolicy) -> LoadedCheckpoint:
    """Every network of a checkpoint, loaded now and owned by the caller (no residency)."""
    started = time.perf_counter()
    info = inspect_checkpoint(path)
    unet = load_unet_part(info, policy.device, policy.keep_or(info.unet_stored, policy.unet_dtype))
    text_models = load_text_part(info, policy.device, policy.text_dtype)
    require_vae(info)
    vae = load_vae_part(path, policy.device, policy.vae_dtype)
    log.info("loaded %s (%s%s) in %.2f s", path.name, info.family.name,
             ", v-prediction" if info.family.prediction == "v" else "", time.perf_counter() - started)
    return LoadedCheckpoint(info.family, unet, text_models, vae, model_sampling_for(info.family, policy.device))


def model_sampling_for(family: Family, device: torch.device) -> ModelSampling:
    # the sigma table lives on the device, so that timestep lookups in the sampling loop copy nothing
    return ModelSampling(family.prediction).to(device)


# -- resident handles -------------------------------------------------------------------------------------------
def open_checkpoint(path: Path, policy: DevicePolicy, cache: ModelCache | None, *, models: ModelFiles | None = None,
                    folder: str = "checkpoints", load: bool = True) -> tuple[DiffusionModel, ClipHandle, VAEHandle]:
    """MODEL, CLIP and VAE handles over the checkpoint's networks, resident in `cache` (shared with every other
    handle of the same file, dtype and device). With `load`, the networks are loaded now (when not resident
    already), so that a damaged file fails in the loader; otherwise on first use."""
    cache = cache if cache is not None else private_cache(policy.device)
    info = inspect_checkpoint(path)
    where = str(path.resolve())
    device = policy.device
    unet_dtype = policy.keep_or(info.unet_stored, policy.unet_dtype)

    def unet_loader() -> tuple[UNetModel, list[UNetModel]]:
        unet = load_unet_part(info, device, unet_dtype)
        return unet, [unet]

    def text_loader() -> tuple[TextEncoder, list[CLIPTextModel]]:
        text_models = load_text_part(info, device, policy.text_dtype)
        return build_encoder(info.family.name, text_models), text_models

    unet = cache.resident(ModelKey(where, "unet", unet_dtype, device), unet_loader, folder=folder,
                          estimate=info.sizes["unet"] * _itemsize(unet_dtype))
    text = cache.resident(ModelKey(where, "text", policy.text_dtype, device), text_loader, folder=folder,
                          estimate=info.sizes["text"] * _itemsize(policy.text_dtype))
    require_vae(info)
    vae = _vae_resident(path, policy, cache, folder, info.sizes["vae"])
    if load:
        for resident in (unet, text, vae):
            resident.ensure_loaded()
    model = DiffusionModel(unet, model_sampling_for(info.family, device), info.family.latent_format,
                           info.family.name, config=info.unet_config)
    clip = ClipHandle(text, embedding_source(models), family=info.family.name)
    return model, clip, VAEHandle(vae)


def open_vae(path: Path, policy: DevicePolicy, cache: ModelCache | None, *, folder: str = "vae",
             load: bool = True) -> VAEHandle:
    """A VAE handle over a standalone VAE file (or a checkpoint's VAE), resident in `cache`."""
    cache = cache if cache is not None else private_cache(policy.device)
    sd = read_state_dict(path)
    prefix = VAE_PREFIX if _has(sd, VAE_PREFIX) else ""
    elements = _count(sd, (prefix,))
    _release(sd)
    resident = _vae_resident(path, policy, cache, folder, elements)
    if load:
        resident.ensure_loaded()
    return VAEHandle(resident)


def _vae_resident(path: Path, policy: DevicePolicy, cache: ModelCache, folder: str, elements: int) -> Resident:
    def loader() -> tuple[AutoencoderKL, list[AutoencoderKL]]:
        vae = load_vae_part(path, policy.device, policy.vae_dtype)
        return vae, [vae]

    key = ModelKey(str(path.resolve()), "vae", policy.vae_dtype, policy.device)
    return cache.resident(key, loader, folder=folder, estimate=elements * _itemsize(policy.vae_dtype))


def private_cache(device: torch.device) -> ModelCache:
    """A cache without a budget for callers that have none (tests, scripts): nothing shared, nothing evicted."""
    return ModelCache(sys.maxsize, device)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
