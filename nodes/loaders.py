"""Loader nodes: checkpoints and standalone VAEs from the data directory's model folders."""
from __future__ import annotations

from engine.checkpoints import load_checkpoint, load_vae_file
from engine.context import NodeContext
from engine.diffusion import DiffusionModel
from engine.errors import EngineError
from engine.text.handle import ClipHandle


class _ModelFileNode:
    """A loader whose input names a file in one model folder: offered from the folder's listing, and a missing
    file is a validation error that says where it was looked for."""
    FOLDER = ""
    INPUT = ""

    @classmethod
    def file_input(cls, context: NodeContext | None) -> tuple[list[str]]:
        return (context.model_names(cls.FOLDER) if context is not None else [],)

    @classmethod
    def VALIDATE_INPUTS(cls, context: NodeContext, **inputs):
        name = inputs.get(cls.INPUT)
        try:
            context.model_path(cls.FOLDER, str(name))
        except EngineError as exc:
            return str(exc)
        return True


class CheckpointLoaderSimple(_ModelFileNode):
    CATEGORY = "loaders"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The model used for denoising latents.", "The CLIP model used for encoding text prompts.",
                       "The VAE model used for encoding and decoding images to and from latent space.")
    FUNCTION = "load_checkpoint"
    DESCRIPTION = "Loads a diffusion model checkpoint."
    FOLDER = "checkpoints"
    INPUT = "ckpt_name"

    @classmethod
    def INPUT_TYPES(cls, context: NodeContext | None = None):
        return {"required": {"ckpt_name": cls.file_input(context)}, "hidden": {"context": "CONTEXT"}}

    def load_checkpoint(self, ckpt_name: str, context: NodeContext):
        loaded = load_checkpoint(context.model_path(self.FOLDER, ckpt_name), context.policy)
        model = DiffusionModel(loaded.unet, loaded.model_sampling, loaded.family.latent_format, loaded.family.name)
        clip = ClipHandle.for_family(loaded.family.name, loaded.text_models, context.models)
        return (model, clip, loaded.vae)


class VAELoader(_ModelFileNode):
    CATEGORY = "loaders"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"
    FOLDER = "vae"
    INPUT = "vae_name"

    @classmethod
    def INPUT_TYPES(cls, context: NodeContext | None = None):
        return {"required": {"vae_name": cls.file_input(context)}, "hidden": {"context": "CONTEXT"}}

    def load_vae(self, vae_name: str, context: NodeContext):
        return (load_vae_file(context.model_path(self.FOLDER, vae_name), context.policy),)


NODE_CLASS_MAPPINGS = {"CheckpointLoaderSimple": CheckpointLoaderSimple, "VAELoader": VAELoader}
NODE_DISPLAY_NAME_MAPPINGS = {"CheckpointLoaderSimple": "Load Checkpoint", "VAELoader": "Load VAE"}
