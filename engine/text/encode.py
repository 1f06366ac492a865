"""Prompt encoding as ComfyUI does it for Stable Diffusion 1.x, 2.x, SDXL and the SDXL refiner.

Scope: from a prompt to the cross-attention conditioning `[1, 77 * chunks, D]` and the pooled vector `[1, P]`
(comfy/sd1_clip.py `ClipTokenWeightEncoder.encode_token_weights` and `SDClipModel`, comfy/sd2_clip.py,
comfy/sdxl_clip.py, `CLIPSetLastLayer`, `CLIPTextEncodeSDXL`):

| family       | encoders            | layer used (no CLIPSetLastLayer)        | D    | pooled                     |
|--------------|---------------------|-----------------------------------------|------|----------------------------|
| SD1          | CLIP-L              | last, final LayerNorm                   | 768  | CLIP-L, not projected      |
| SD2          | ViT-H               | penultimate, through the final LayerNorm | 1024 | ViT-H, projected           |
| SDXL         | CLIP-L + ViT-bigG   | penultimate of each, no LayerNorm       | 2048 | ViT-bigG, projected (1280) |
| SDXL refiner | ViT-bigG            | penultimate, no LayerNorm               | 1280 | ViT-bigG, projected        |

Weights: when any entry of a prompt has a weight other than 1, an empty prompt is encoded in the same batch
and each weighted position becomes `(z - z_empty) * weight + z_empty`. Chunks are encoded as one batch and
concatenated along the token axis; the pooled vector is the first chunk's.

`clip_skip` is CLIPSetLastLayer's `stop_at_clip_layer` (-1 = the last layer, -2 = the penultimate, ...), applied
to every encoder of the family; None keeps the family's default above. As in ComfyUI, -1 selects the last
layer's hidden state (through the final LayerNorm only where the family normalises hidden states), and a value
beyond the depth of an encoder falls back to its final-LayerNorm output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from engine.models.clip import CLIPTextModel
from engine.text.tokenizer import Chunk, ClipTokenizer, EmbeddingSource, build_bpe


@dataclass(frozen=True)
class ClipBranch:
    """One CLIP text model and the options a model family runs it with (ComfyUI's `SDClipModel` arguments)."""

    model: CLIPTextModel
    tokenizer: ClipTokenizer
    default_layer: int | None  # None: the final-LayerNorm output; else a hidden layer index (negative from the end)
    normalize_hidden: bool  # ComfyUI's layer_norm_hidden_state: pass a chosen hidden layer through the final LN
    projected_pooled: bool  # pooled through text_projection (when the checkpoint has one)

    def layer(self, clip_skip: int | None) -> int | None:
        if clip_skip is None:
            return self.default_layer
        if abs(clip_skip) > self.model.config.layers:
            return None
        return clip_skip

    def encode(self, chunks: Sequence[Chunk], clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`([1, 77 * len(chunks), width], [1, P])` in float32 on the model's device."""
        rows = [[entry for entry, _ in chunk] for chunk in chunks]
        weighted = any(w != 1.0 for chunk in chunks for _, w in chunk)  # Python floats: 1.0000001 counts
        if weighted:
            rows.append([entry for entry, _ in self.tokenizer.empty_chunk()])
        ids, embeds = self.model.embed(rows, pad_token=self.tokenizer.pad_token)
        layer = self.layer(clip_skip)
        out = self.model(ids, embeds, hidden_layer=layer, normalize_hidden=self.normalize_hidden)
        z = (out.last_hidden_state if layer is None else out.hidden_state).float()  # (chunks [+1], 77, width)
        use_projection = self.projected_pooled and out.projected is not None
        pooled = (out.projected if use_projection else out.pooled)[0:1].float()
        if weighted:
            z_empty, z = z[-1], z[:-1]
            weights = torch.tensor([[w for _, w in c] for c in chunks], dtype=z.dtype, device=z.device)
            apply = torch.tensor([[w != 1.0 for _, w in c] for c in chunks], device=z.device)
            z = torch.where(apply[..., None], (z - z_empty) * weights[..., None] + z_empty, z)
        return z.reshape(1, -1, z.shape[-1]), pooled  # (1, chunks * 77, width)


class TextEncoder:
    """The text side of one model family: tokenize a prompt per CLIP, encode, combine as ComfyUI does."""

    def __init__(self, family: str, branches: Mapping[str, ClipBranch]):
        self.family = family
        self.branches = dict(branches)

    @classmethod
    def sd1(cls, clip_l: CLIPTextModel) -> TextEncoder:
        tok = ClipTokenizer(None, embedding_size=768, embedding_key="clip_l")
        return cls("sd1", {"l": ClipBranch(clip_l, tok, None, True, False)})

    @classmethod
    def sd2(cls, clip_h: CLIPTextModel) -> TextEncoder:
        # ComfyUI's SD2 tokenizer keeps SDTokenizer's default embedding key, "clip_l".
        tok = ClipTokenizer(0, embedding_size=1024, embedding_key="clip_l")
        return cls("sd2", {"h": ClipBranch(clip_h, tok, -2, True, True)})

    @classmethod
    def sdxl(cls, clip_l: CLIPTextModel, clip_g: CLIPTextModel) -> TextEncoder:
        bpe = build_bpe()
        tok_l = ClipTokenizer(None, embedding_size=768, embedding_key="clip_l", bpe=bpe)
        tok_g = ClipTokenizer(0, embedding_size=1280, embedding_key="clip_g", bpe=bpe)
        return cls("sdxl", {
            "l": ClipBranch(clip_l, tok_l, -2, False, True),
            "g": ClipBranch(clip_g, tok_g, -2, False, True),
        })

    @classmethod
    def sdxl_refiner(cls, clip_g: CLIPTextModel) -> TextEncoder:
        tok = ClipTokenizer(0, embedding_size=1280, embedding_key="clip_g")
        return cls("sdxl_refiner", {"g": ClipBranch(clip_g, tok, -2, False, True)})

    @property
    def device(self) -> torch.device:
        model = next(iter(self.branches.values())).model
        return model.text_model.embeddings.token_embedding.weight.device

    def tokenize(self, text: str, *, embeddings: EmbeddingSource | None = None) -> dict[str, list[Chunk]]:
        """The chunks of `text` for each CLIP of the family ("l", "h", "g"), as ComfyUI's CLIP.tokenize."""
        return {name: b.tokenizer.tokenize_with_weights(text, embeddings) for name, b in self.branches.items()}

    def encode_tokens(
        self, tokens: Mapping[str, Sequence[Chunk]], *, clip_skip: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond `[1, 77 * chunks, D]`, pooled `[1, P]`) from `tokenize`'s chunks, as ComfyUI's encode_from_tokens."""
        if self.family == "sdxl":
            l_out, _ = self.branches["l"].encode(tokens["l"], clip_skip)
            g_out, g_pooled = self.branches["g"].encode(tokens["g"], clip_skip)
            n = min(l_out.shape[1], g_out.shape[1])
            return torch.cat([l_out[:, :n], g_out[:, :n]], dim=-1), g_pooled  # (1, T, 768 + 1280)
        (name, branch), = self.branches.items()
        return branch.encode(tokens[name], clip_skip)

    def encode(
        self, text: str, *, clip_skip: int | None = None, embeddings: EmbeddingSource | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIPTextEncode: (cond `[1, 77 * chunks, D]`, pooled `[1, P]`), float32 on the encoder's device.

        Pass `embeddings` (even an empty folder) for ComfyUI's handling of `embedding:name`; without it the
        words stay text.
        """
        return self.encode_tokens(self.tokenize(text, embeddings=embeddings), clip_skip=clip_skip)

    def encode_sdxl_parts(
        self,
        text_l: str,
        text_g: str,
        *,
        clip_skip: int | None = None,
        embeddings: EmbeddingSource | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIPTextEncodeSDXL: `text_l` for CLIP-L, `text_g` for ViT-bigG; the shorter is padded with empty chunks."""
        if self.family != "sdxl":
            raise ValueError(f"separate CLIP-L and CLIP-G prompts need an SDXL text encoder, this one is {self.family}")
        l_branch, g_branch = self.branches["l"], self.branches["g"]
        tokens = {
            "l": l_branch.tokenizer.tokenize_with_weights(text_l, embeddings),
            "g": g_branch.tokenizer.tokenize_with_weights(text_g, embeddings),
        }
        while len(tokens["l"]) < len(tokens["g"]):
            tokens["l"].append(l_branch.tokenizer.empty_chunk())
        while len(tokens["g"]) < len(tokens["l"]):
            tokens["g"].append(g_branch.tokenizer.empty_chunk())
        return self.encode_tokens(tokens, clip_skip=clip_skip)
