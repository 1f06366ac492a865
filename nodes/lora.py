"""LoRA loader nodes: a file from `models/loras/` added as weight patches to a MODEL and CLIP handle.

The handles that come out share the weights of the ones that went in and carry one more patch set each; the
weights are patched in place when a node runs the network (engine/patching.py), never copied per LoRA.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from torch import nn

from engine.context import NodeContext
from engine.errors import EngineError
from engine.lora import Lora, match_lora, read_lora
from engine.models.unet import UNetConfig, UNetModel
from engine.text.handle import text_modules

FOLDER = "loras"
_STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}


def lora_names(context: NodeContext | None) -> list[str]:
    return context.models.list(FOLDER) if context is not None and context.models is not None else []


def match_file(context: NodeContext, lora_name: str, model: Any = None, clip: Any = None) -> Lora:
    """The file `lora_name` matched against the networks of `model` and/or `clip`, whichever are given."""
    sd = read_lora(context.model_path(FOLDER, lora_name))
    with ExitStack() as stack:
        networks = {}
        if model is not None:
            networks["unet"] = _unet_structure(model, stack)
        if clip is not None:  # the patch targets the CLIP handle patches: "text0", "text1" in checkpoint order
            networks.update(text_modules(stack.enter_context(clip.active())))
        family = clip.family if clip is not None else model.family
        return match_lora(sd, networks, family, lora_name)


def _unet_structure(model: Any, stack: ExitStack) -> nn.Module:
    """The UNet's parameter names and shapes: a meta-device replica built from the handle's config when it has one
    (nothing loaded, no patches applied for a LoRA that only needs names), else the network itself."""
    config = getattr(model, "config", None)
    if isinstance(config, UNetConfig):
        return UNetModel(config, device="meta")
    return stack.enter_context(model.active())


class LoraLoader:
    CATEGORY = "loaders"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The modified diffusion model.", "The modified CLIP model.")
    FUNCTION = "load_lora"
    DESCRIPTION = ("LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are "
                   "denoised such as applying styles. Multiple LoRA nodes can be linked together.")

    @classmethod
    def INPUT_TYPES(cls, context: NodeContext | None = None):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}),
            "lora_name": (lora_names(context), {"tooltip": "The name of the LoRA."}),
            "strength_model": ("FLOAT", {**_STRENGTH, "tooltip": "How strongly to modify the diffusion model. "
                                                                 "This value can be negative."}),
            "strength_clip": ("FLOAT", {**_STRENGTH, "tooltip": "How strongly to modify the CLIP model. "
                                                                "This value can be negative."}),
        }, "hidden": {"context": "CONTEXT"}}

    @classmethod
    def VALIDATE_INPUTS(cls, context: NodeContext, lora_name: Any):
        """A missing file is a validation error that says where it was looked for (no download here)."""
        if context is None or context.models is None:
            return "no model folders are configured"
        try:
            context.models.check(FOLDER, str(lora_name))
        except EngineError as exc:
            return str(exc)
        return True

    def load_lora(self, model, clip, lora_name: str, strength_model: float, strength_clip: float,
                  context: NodeContext):
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        lora = match_file(context, lora_name, model if strength_model != 0 else None,
                         clip if strength_clip != 0 else None)
        return (_patched_model(model, lora, strength_model), _patched_clip(clip, lora, strength_clip))


class LoraLoaderModelOnly(LoraLoader):
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The modified diffusion model.",)
    FUNCTION = "load_lora_model_only"

    @classmethod
    def INPUT_TYPES(cls, context: NodeContext | None = None):
        return {"required": {
            "model": ("MODEL",),
            "lora_name": (lora_names(context),),
            "strength_model": ("FLOAT", dict(_STRENGTH)),
        }, "hidden": {"context": "CONTEXT"}}

    def load_lora_model_only(self, model, lora_name: str, strength_model: float, context: NodeContext):
        if strength_model == 0:
            return (model,)
        return (_patched_model(model, match_file(context, lora_name, model=model), strength_model),)


def _patched_model(model, lora: Lora, strength: float):
    """A strength of 0, or a LoRA without UNet entries, leaves the handle as it was (as ComfyUI's patches would)."""
    patch_set = lora.patch_set("unet", strength)
    return model.with_patches(patch_set) if strength != 0 and len(patch_set) else model


def _patched_clip(clip, lora: Lora, strength: float):
    if strength == 0:
        return clip
    patch_sets = [lora.patch_set(target, strength) for target in sorted(lora.patches) if target.startswith("text")]
    patch_sets = [s for s in patch_sets if len(s)]
    return clip.with_patches(*patch_sets) if patch_sets else clip


NODE_CLASS_MAPPINGS = {"LoraLoader": LoraLoader, "LoraLoaderModelOnly": LoraLoaderModelOnly}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraLoader": "Load LoRA (Model and CLIP)", "LoraLoaderModelOnly": "Load LoRA"}
