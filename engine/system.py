"""`/system_stats`: the host and its devices, in ComfyUI's shape."""
from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch

VERSION = "0.1.0"


def system_stats() -> dict[str, Any]:
    page = os.sysconf("SC_PAGE_SIZE")
    return {
        "system": {
            "os": os.name,
            "python_version": sys.version,
            "embedded_python": False,
            "comfyui_version": VERSION,
            "pytorch_version": torch.__version__,
            "platform": platform.platform(),
            "ram_total": page * os.sysconf("SC_PHYS_PAGES"),
            "ram_free": page * os.sysconf("SC_AVPHYS_PAGES"),
            "argv": sys.argv,
        },
        "devices": [_device(i) for i in range(torch.cuda.device_count())] or [_cpu()],
    }


def _device(index: int) -> dict[str, Any]:
    free, total = torch.cuda.mem_get_info(index)
    return {
        "name": f"cuda:{index} {torch.cuda.get_device_name(index)}",
        "type": "cuda",
        "index": index,
        "vram_total": total,
        "vram_free": free,
        "torch_vram_total": torch.cuda.memory_reserved(index),
        "torch_vram_free": torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index),
    }


def _cpu() -> dict[str, Any]:
    page = os.sysconf("SC_PAGE_SIZE")
    total, free = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    return {"name": "cpu", "type": "cpu", "index": None, "vram_total": total, "vram_free": free,
            "torch_vram_total": total, "torch_vram_free": free}
