"""The CLIP a prompt passes between nodes: a handle to a family's resident text encoder, the embeddings folders for
`embedding:name`, the layer CLIPSetLastLayer chose, and the patches (LoRA) later nodes added. Immutable:
CLIPSetLastLayer and LoraLoader return new handles over the same weights.

`encode` and `encode_sdxl` make the encoder active for their call; several calls in a row may share one
activation with `with clip.active():`.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from engine.handles import ActiveSlot, activate
from engine.modelfiles import ModelFiles
from engine.models.clip import CLIPTextModel
from engine.patching import PatchSet
from engine.residency import Resident
from engine.text.encode import TextEncoder
from engine.text.tokenizer import EmbeddingSource

_FAMILIES = {"sd1": TextEncoder.sd1, "sd2": TextEncoder.sd2, "sdxl": TextEncoder.sdxl,
             "sdxl_refiner": TextEncoder.sdxl_refiner}


def build_encoder(family: str, text_models: Sequence[CLIPTextModel]) -> TextEncoder:
    """The family's TextEncoder over its CLIP models, in the checkpoint's order."""
    return _FAMILIES[family](*text_models)


def text_modules(encoder: TextEncoder) -> dict[str, torch.nn.Module]:
    """The encoder's CLIP models by patch target: "text0", "text1", ... in the checkpoint's order."""
    return {f"text{i}": branch.model for i, branch in enumerate(encoder.branches.values())}


@dataclass(frozen=True, eq=False)
class ClipHandle:
    resident: Resident  # value: TextEncoder; a TextEncoder itself is accepted and kept as it is
    embeddings: EmbeddingSource
    clip_skip: int | None = None  # None: the family's default layer (no CLIPSetLastLayer in the prompt)
    patches: tuple[PatchSet, ...] = ()  # targets "text0", "text1": the CLIP models in the checkpoint's order
    family: str = ""  # sd1, sd2, sdxl, sdxl_refiner
    _active: ActiveSlot = field(default_factory=ActiveSlot, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.resident, TextEncoder):
            encoder = self.resident
            modules = list(text_modules(encoder).values())
            object.__setattr__(self, "resident", Resident.fixed(encoder, modules, "text"))
            object.__setattr__(self, "family", self.family or encoder.family)

    @classmethod
    def for_family(cls, family: str, text_models: Sequence[CLIPTextModel], models: ModelFiles | None) -> ClipHandle:
        """A handle over text models already built (no cache manages them)."""
        return cls(build_encoder(family, text_models), embedding_source(models))

    def active(self) -> AbstractContextManager[TextEncoder]:
        """The text encoder, loaded, pinned and patched with this handle's patches for the duration of the block."""
        return activate(self._active, self.resident, text_modules, self.patches)

    @property
    def encoder(self) -> TextEncoder:
        """The encoder as it is now (loaded if it was evicted; not pinned; with whatever patches were applied
        last): for inspection. Run it through `active()`."""
        with self.resident.use() as encoder:
            return encoder

    def with_layer(self, layer: int) -> ClipHandle:
        return replace(self, clip_skip=layer)

    def with_patches(self, *patch_sets: PatchSet) -> ClipHandle:
        """A new handle over the same weights with `patch_sets` added after this one's."""
        return replace(self, patches=self.patches + tuple(patch_sets))

    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, pooled) on the CPU, where ComfyUI keeps conditioning between nodes."""
        with self.active() as encoder:
            cond, pooled = encoder.encode(text, clip_skip=self.clip_skip, embeddings=self.embeddings)
        return cond.cpu(), pooled.cpu()

    def encode_sdxl(self, text_l: str, text_g: str) -> tuple[torch.Tensor, torch.Tensor]:
        with self.active() as encoder:
            cond, pooled = encoder.encode_sdxl_parts(text_l, text_g, clip_skip=self.clip_skip,
                                                     embeddings=self.embeddings)
        return cond.cpu(), pooled.cpu()


def embedding_source(models: ModelFiles | None) -> EmbeddingSource:
    """Every embeddings folder (the data directory's and those extra_model_paths.yaml adds), in search order."""
    folders: list[Path] = models.folders("embeddings") if models is not None else []
    return EmbeddingSource.of(*folders)
