"""Conditioning nodes that mix prompts or limit where and when a prompt applies: average, concat, area (pixels
or fractions), area strength, mask, timestep range. They only write ComfyUI's option keys; the sampler applies
them (engine/inpaint.py turns the options into guidance fields, engine/sampling/guidance.py uses them)."""
from __future__ import annotations

import logging
from typing import Any

import torch

MAX_RESOLUTION = 16384

log = logging.getLogger(__name__)


def set_values(conditioning: list, values: dict[str, Any]) -> list:
    """Each entry with `values` added to a copy of its options (ComfyUI's conditioning_set_values)."""
    return [[tensor, {**options, **values}] for tensor, options in conditioning]


def _first_only(node: str, conditioning_from: list) -> None:
    if len(conditioning_from) > 1:
        log.warning("%s: conditioning_from holds %d entries; only the first is applied", node, len(conditioning_from))


class ConditioningAverage:
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "addWeighted"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning_to": ("CONDITIONING",), "conditioning_from": ("CONDITIONING",),
            "conditioning_to_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    def addWeighted(self, conditioning_to, conditioning_from, conditioning_to_strength):
        _first_only("ConditioningAverage", conditioning_from)
        cond_from = conditioning_from[0][0]
        pooled_from = conditioning_from[0][1].get("pooled_output", None)
        out = []
        for tensor, options in conditioning_to:
            # the "from" tokens cut or zero-padded to the "to" length
            t0 = cond_from[:, :tensor.shape[1]]
            if t0.shape[1] < tensor.shape[1]:
                t0 = torch.cat([t0, torch.zeros((1, tensor.shape[1] - t0.shape[1], tensor.shape[2]))], dim=1)
            mixed = torch.mul(tensor, conditioning_to_strength) + torch.mul(t0, 1.0 - conditioning_to_strength)
            options = dict(options)
            pooled_to = options.get("pooled_output", pooled_from)
            if pooled_from is not None and pooled_to is not None:
                options["pooled_output"] = (torch.mul(pooled_to, conditioning_to_strength)
                                            + torch.mul(pooled_from, 1.0 - conditioning_to_strength))
            elif pooled_from is not None:
                options["pooled_output"] = pooled_from
            out.append([mixed, options])
        return (out,)


class ConditioningConcat:
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "concat"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning_to": ("CONDITIONING",), "conditioning_from": ("CONDITIONING",)}}

    def concat(self, conditioning_to, conditioning_from):
        _first_only("ConditioningConcat", conditioning_from)
        cond_from = conditioning_from[0][0]
        return ([[torch.cat((tensor, cond_from), 1), dict(options)] for tensor, options in conditioning_to],)


class ConditioningSetArea:
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "width": ("INT", {"default": 64, "min": 64, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 64, "min": 64, "max": MAX_RESOLUTION, "step": 8}),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        }}

    def append(self, conditioning, width, height, x, y, strength):
        area = (height // 8, width // 8, y // 8, x // 8)  # pixels to latent pixels
        return (set_values(conditioning, {"area": area, "strength": strength, "set_area_to_bounds": False}),)


class ConditioningSetAreaPercentage:
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"

    @classmethod
    def INPUT_TYPES(cls):
        fraction = {"min": 0, "max": 1.0, "step": 0.01}
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "width": ("FLOAT", {"default": 1.0, **fraction}),
            "height": ("FLOAT", {"default": 1.0, **fraction}),
            "x": ("FLOAT", {"default": 0, **fraction}),
            "y": ("FLOAT", {"default": 0, **fraction}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        }}

    def append(self, conditioning, width, height, x, y, strength):
        area = ("percentage", height, width, y, x)
        return (set_values(conditioning, {"area": area, "strength": strength, "set_area_to_bounds": False}),)


class ConditioningSetAreaStrength:
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        }}

    def append(self, conditioning, strength):
        return (set_values(conditioning, {"strength": strength}),)


class ConditioningSetMask:
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "mask": ("MASK",),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
            "set_cond_area": (["default", "mask bounds"],),
        }}

    def append(self, conditioning, mask, set_cond_area, strength):
        if mask.ndim < 3:
            mask = mask.unsqueeze(0)
        return (set_values(conditioning, {"mask": mask, "set_area_to_bounds": set_cond_area != "default",
                                          "mask_strength": strength}),)


class ConditioningSetTimestepRange:
    CATEGORY = "advanced/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "set_range"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        }}

    def set_range(self, conditioning, start, end):
        return (set_values(conditioning, {"start_percent": start, "end_percent": end}),)


NODE_CLASS_MAPPINGS = {
    "ConditioningAverage": ConditioningAverage,
    "ConditioningConcat": ConditioningConcat,
    "ConditioningSetArea": ConditioningSetArea,
    "ConditioningSetAreaPercentage": ConditioningSetAreaPercentage,
    "ConditioningSetAreaStrength": ConditioningSetAreaStrength,
    "ConditioningSetMask": ConditioningSetMask,
    "ConditioningSetTimestepRange": ConditioningSetTimestepRange,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    # ComfyUI's own table misspells the ConditioningAverage key, so it shows under its class name
    "ConditioningConcat": "Conditioning (Concat)",
    "ConditioningSetArea": "Conditioning (Set Area)",
    "ConditioningSetAreaPercentage": "Conditioning (Set Area with Percentage)",
    "ConditioningSetMask": "Conditioning (Set Mask)",
}
