"""Loader nodes: checkpoints and standalone VAEs from the data directory's model folders, handed out as handles
to networks resident in the executor's model cache (`context.resident`), shared by every prompt that names the
same file."""
from __future__ import annotations

from pathlib import Path

from engine.checkpoints import open_checkpoint, open_vae
from engine.context import NodeContext
from engine.errors import EngineError, NotFound


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
        if context.models is None:
            return "this context has no model folders"
        try:
            context.models.check(cls.FOLDER, str(name))  # no download while validating: only whether one can
        except EngineError as exc:
            return str(exc)
        return True

    @classmethod
    def path(cls, context: NodeContext, name: str) -> Path:
        """The file's local path, downloading it first when the registry or an hf:// reference names it (its
        progress is the node's progress)."""
        if context.models is None:
            raise NotFound("this context has no model folders")
        return context.models.find(cls.FOLDER, name, progress=context.progress)


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
        return open_checkpoint(self.path(context, ckpt_name), context.policy, _resident(context),
                               models=context.models, folder=self.FOLDER)


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
        return (open_vae(self.path(context, vae_name), context.policy, _resident(context),
                         folder=self.FOLDER),)


def _resident(context: NodeContext):
    """The executor's model cache; None (a private cache per load) for a context made without one."""
    return getattr(context, "resident", None)


NODE_CLASS_MAPPINGS = {"CheckpointLoaderSimple": CheckpointLoaderSimple, "VAELoader": VAELoader}
NODE_DISPLAY_NAME_MAPPINGS = {"CheckpointLoaderSimple": "Load Checkpoint", "VAELoader": "Load VAE"}
