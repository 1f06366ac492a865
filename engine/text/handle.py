"""The CLIP a prompt passes between nodes: a family's text encoder, the embeddings folder for `embedding:name`,
and the layer CLIPSetLastLayer chose. Immutable: CLIPSetLastLayer returns a new handle over the same weights."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from engine.modelfiles import ModelFiles
from engine.models.clip import CLIPTextModel
from engine.text.encode import TextEncoder
from engine.text.tokenizer import EmbeddingSource

_FAMILIES = {"sd1": TextEncoder.sd1, "sd2": TextEncoder.sd2, "sdxl": TextEncoder.sdxl,
             "sdxl_refiner": TextEncoder.sdxl_refiner}


@dataclass(frozen=True)
class ClipHandle:
    encoder: TextEncoder
    embeddings: EmbeddingSource
    clip_skip: int | None = None  # None: the family's default layer (no CLIPSetLastLayer in the prompt)

    @classmethod
    def for_family(cls, family: str, text_models: Sequence[CLIPTextModel], models: ModelFiles | None) -> ClipHandle:
        folders = [models.folder("embeddings")] if models is not None else []
        return cls(_FAMILIES[family](*text_models), EmbeddingSource.of(*folders))

    @property
    def family(self) -> str:
        return self.encoder.family

    def with_layer(self, layer: int) -> ClipHandle:
        return replace(self, clip_skip=layer)

    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, pooled) on the CPU, where ComfyUI keeps conditioning between nodes."""
        cond, pooled = self.encoder.encode(text, clip_skip=self.clip_skip, embeddings=self.embeddings)
        return cond.cpu(), pooled.cpu()

    def encode_sdxl(self, text_l: str, text_g: str) -> tuple[torch.Tensor, torch.Tensor]:
        cond, pooled = self.encoder.encode_sdxl_parts(text_l, text_g, clip_skip=self.clip_skip,
                                                      embeddings=self.embeddings)
        return cond.cpu(), pooled.cpu()
