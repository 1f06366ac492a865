"""Which device the executor runs on and which dtypes each kind of network uses there.

On CUDA: the UNet and text encoders in fp16 where the GPU computes it well (bf16 where fp16 is unsupported), the
VAE in bf16 where supported (fp16 VAEs overflow on SDXL), else fp32; on the CPU everything in fp32, as ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DevicePolicy:
    device: torch.device
    unet_dtype: torch.dtype
    text_dtype: torch.dtype
    vae_dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def keep_or(self, stored: torch.dtype, preferred: torch.dtype) -> torch.dtype:
        """On a GPU, half-precision weights stay in the dtype they were saved in (no conversion, no extra copy);
        anything else, and everything on the CPU, gets the preferred dtype."""
        if self.is_cuda and stored in (torch.float16, torch.bfloat16):
            if stored == torch.float16 or torch.cuda.is_bf16_supported():
                return stored
        return preferred


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks the first CUDA device when there is one; otherwise a name like `cpu` or `cuda:1`."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no CUDA device")
    return device


def policy_for(device: torch.device, force_fp32: bool = False) -> DevicePolicy:
    if device.type != "cuda" or force_fp32:
        return DevicePolicy(device, torch.float32, torch.float32, torch.float32)
    major, _minor = torch.cuda.get_device_capability(device)
    half = torch.float16 if major >= 7 else torch.float32  # fp16 is slow before Volta
    vae = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return DevicePolicy(device, half, half, vae)
