"""Tiny random-weight checkpoints in the real single-file layouts of SD1.x, SD2.x, SDXL base and SDXL refiner.

Small channel counts, the real key names and prefixes: the real loaders, family detection, samplers and nodes
run on them in seconds on a CPU. Weights are seeded, so every build of a family is identical.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.models.clip import CLIPTextConfig, CLIPTextModel
from engine.models.unet import UNetConfig, UNetModel
from engine.models.vae import AutoencoderKL, VAEConfig

TEXT = dict(width=64, layers=2, heads=1, mlp_width=128)


def sd1_unet(in_channels: int = 4) -> UNetConfig:
    return UNetConfig(in_channels=in_channels, model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1),
                      transformer_depth=(1, 1), transformer_depth_output=(1, 1, 1, 1), num_heads=8,
                      context_dim=64)


def linear_unet(context_dim: int, adm: int | None, depth=(1, 1), depth_output=(1, 1, 1, 1)) -> UNetConfig:
    return UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=depth,
                      transformer_depth_output=depth_output, num_heads=None, num_head_channels=64,
                      context_dim=context_dim, use_linear_in_transformer=True, adm_in_channels=adm)


FAMILIES = {
    # name: (unet config, [(prefix, layout, text config)])
    "sd1": (sd1_unet(), [("cond_stage_model.transformer.", "hf", CLIPTextConfig(**TEXT))]),
    "sd2": (linear_unet(64, None),
            [("cond_stage_model.model.", "openclip", CLIPTextConfig(**TEXT, activation="gelu", projection_dim=64))]),
    "sdxl": (linear_unet(128, 64 + 6 * 256, depth=(0, 1), depth_output=(0, 0, 1, 1)),
             [("conditioner.embedders.0.transformer.", "hf", CLIPTextConfig(**TEXT)),
              ("conditioner.embedders.1.model.", "openclip",
               CLIPTextConfig(**TEXT, activation="gelu", projection_dim=64))]),
    "sdxl_refiner": (linear_unet(64, 64 + 5 * 256, depth=(0, 1), depth_output=(0, 0, 1, 1)),
                     [("conditioner.embedders.0.model.", "openclip",
                       CLIPTextConfig(**TEXT, activation="gelu", projection_dim=64))]),
}
VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)


def randomize(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded weights of a sensible scale for every parameter (the modules skip random initialisation)."""
    out = {}
    for name, tensor in module.state_dict().items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
        elif tensor.ndim >= 2:
            fan_in = math.prod(tensor.shape[1:]) if "embedding" not in name else tensor.shape[-1]
            out[name] = torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in)
        elif name.endswith("weight"):  # norm scales
            out[name] = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        else:
            out[name] = 0.02 * torch.randn(tensor.shape, generator=generator)
    return out


def to_openclip(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (Hugging Face) CLIP names in OpenCLIP's layout, with q/k/v fused into in_proj as SD2/SDXL files hold."""
    out = {"token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": hf["text_model.final_layer_norm.weight"],
           "ln_final.bias": hf["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in hf:
        out["text_projection"] = hf["text_projection.weight"].T.contiguous()
    layer = 0
    while f"text_model.encoder.layers.{layer}.layer_norm1.weight" in hf:
        src, dst = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([hf[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[dst + f"{theirs}.{kind}"] = hf[src + f"{ours}.{kind}"]
        layer += 1
    return out


def checkpoint_state_dict(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    unet_config, encoders = FAMILIES[family]
    generator = torch.Generator().manual_seed(seed)
    sd = {f"model.diffusion_model.{k}": v for k, v in randomize(UNetModel(unet_config), generator).items()}
    sd.update({f"first_stage_model.{k}": v for k, v in randomize(AutoencoderKL(VAE), generator).items()})
    for prefix, layout, config in encoders:
        weights = randomize(CLIPTextModel(config), generator)
        weights = to_openclip(weights) if layout == "openclip" else weights
        sd.update({prefix + k: v for k, v in weights.items()})
    return sd


def write_checkpoint(folder: Path, family: str, seed: int = 0, name: str | None = None) -> Path:
    path = folder / (name or f"tiny_{family}.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in checkpoint_state_dict(family, seed).items()}, str(path))
    return path
