"""Conditioning nodes: text encoding (plain, SDXL, SDXL refiner), CLIP layer choice, combining, zeroing."""
from __future__ import annotations

import torch

from engine.text.handle import ClipHandle

MAX_RESOLUTION = 16384


class CLIPTextEncode:
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    DESCRIPTION = "Encodes a text prompt using a CLIP model into an embedding that guides the diffusion model."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)}}

    def encode(self, clip: ClipHandle, text: str):
        cond, pooled = clip.encode(text)
        return ([[cond, {"pooled_output": pooled}]],)


class CLIPSetLastLayer:
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "set_last_layer"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",),
                             "stop_at_clip_layer": ("INT", {"default": -1, "min": -24, "max": -1, "step": 1})}}

    def set_last_layer(self, clip: ClipHandle, stop_at_clip_layer: int):
        return (clip.with_layer(stop_at_clip_layer),)


class CLIPTextEncodeSDXL:
    CATEGORY = "advanced/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 1024, "min": 0, "max": MAX_RESOLUTION}
        crop = {"default": 0, "min": 0, "max": MAX_RESOLUTION}
        return {"required": {
            "clip": ("CLIP",),
            "width": ("INT", size), "height": ("INT", size),
            "crop_w": ("INT", crop), "crop_h": ("INT", crop),
            "target_width": ("INT", size), "target_height": ("INT", size),
            "text_g": ("STRING", {"multiline": True, "dynamicPrompts": True}),
            "text_l": ("STRING", {"multiline": True, "dynamicPrompts": True}),
        }}

    def encode(self, clip: ClipHandle, width, height, crop_w, crop_h, target_width, target_height, text_g, text_l):
        cond, pooled = clip.encode_sdxl(text_l, text_g)
        return ([[cond, {"pooled_output": pooled, "width": width, "height": height, "crop_w": crop_w,
                         "crop_h": crop_h, "target_width": target_width, "target_height": target_height}]],)


class CLIPTextEncodeSDXLRefiner:
    CATEGORY = "advanced/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ascore": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 1000.0, "step": 0.01}),
            "width": ("INT", {"default": 1024, "min": 0, "max": MAX_RESOLUTION}),
            "height": ("INT", {"default": 1024, "min": 0, "max": MAX_RESOLUTION}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
            "clip": ("CLIP",),
        }}

    def encode(self, clip: ClipHandle, ascore, width, height, text):
        cond, pooled = clip.encode(text)
        return ([[cond, {"pooled_output": pooled, "aesthetic_score": ascore, "width": width, "height": height}]],)


class ConditioningCombine:
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning_1": ("CONDITIONING",), "conditioning_2": ("CONDITIONING",)}}

    def combine(self, conditioning_1, conditioning_2):
        return (conditioning_1 + conditioning_2,)


class ConditioningZeroOut:
    CATEGORY = "advanced/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "zero_out"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    def zero_out(self, conditioning):
        out = []
        for tensor, options in conditioning:
            options = dict(options)
            if options.get("pooled_output") is not None:
                options["pooled_output"] = torch.zeros_like(options["pooled_output"])
            out.append([torch.zeros_like(tensor), options])
        return (out,)


NODE_CLASS_MAPPINGS = {
    "CLIPTextEncode": CLIPTextEncode,
    "CLIPSetLastLayer": CLIPSetLastLayer,
    "CLIPTextEncodeSDXL": CLIPTextEncodeSDXL,
    "CLIPTextEncodeSDXLRefiner": CLIPTextEncodeSDXLRefiner,
    "ConditioningCombine": ConditioningCombine,
    "ConditioningZeroOut": ConditioningZeroOut,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "CLIPSetLastLayer": "CLIP Set Last Layer",
    "CLIPTextEncodeSDXL": "CLIPTextEncodeSDXL",
    "CLIPTextEncodeSDXLRefiner": "CLIPTextEncodeSDXLRefiner",
    "ConditioningCombine": "Conditioning (Combine)",
    "ConditioningZeroOut": "ConditioningZeroOut",
}
