"""The CLIP text transformer of Stable Diffusion 1.x, 2.x and SDXL.

Scope: the text tower only, in three sizes that differ in width, depth and activation:

- OpenAI CLIP ViT-L/14 (SD1 and SDXL's first encoder): width 768, 12 layers, quick-GELU.
- OpenCLIP ViT-H/14 (SD2): width 1024, 24 layers, GELU, a text projection.
- OpenCLIP ViT-bigG/14 (SDXL's second encoder): width 1280, 32 layers, GELU, a text projection.

A pre-LayerNorm transformer with causal self-attention over 77 positions; no padding mask, as ComfyUI runs it.
The outputs are what the prompt encoder needs: the final-LayerNorm sequence, the hidden state after a chosen
layer, and the pooled vector (the final-LayerNorm state at the first end token, optionally projected).

Parameter names follow Hugging Face's `CLIPTextModelWithProjection`; `convert_clip_state_dict` is the one place
that maps checkpoint layouts (Hugging Face under `cond_stage_model.transformer.`, OpenCLIP under
`cond_stage_model.model.` / `conditioner.embedders.1.model.`) onto them.

References: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision";
Cherti et al. 2023, "Reproducible scaling laws for contrastive language-image learning" (OpenCLIP);
ComfyUI's comfy/clip_model.py for the inference-time behaviour.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

END_TOKEN = 49407
_PLACEHOLDER = -1  # the id of a position whose input embedding is given as a vector (textual inversion)


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408  # the shared byte-level BPE vocabulary
    max_positions: int = 77  # context length: start token, 75 tokens, end token
    width: int = 768  # 768 CLIP-L, 1024 ViT-H, 1280 ViT-bigG
    layers: int = 12  # 12 CLIP-L, 24 ViT-H, 32 ViT-bigG
    heads: int = 12  # width // 64 for all three
    mlp_width: int = 3072  # 4 * width for all three
    activation: str = "quick_gelu"  # OpenAI's CLIP-L was trained with quick-GELU, OpenCLIP's models with GELU
    projection_dim: int | None = None  # output width of text_projection; None when the checkpoint has none
    layer_norm_eps: float = 1e-5
    end_token: int = END_TOKEN  # the pooled output is read at its first occurrence

    @classmethod
    def clip_l(cls) -> CLIPTextConfig:
        return cls()

    @classmethod
    def vit_h(cls) -> CLIPTextConfig:
        return cls(width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu", projection_dim=1024)

    @classmethod
    def vit_bigg(cls) -> CLIPTextConfig:
        return cls(width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", projection_dim=1280)


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, T, width), after the final LayerNorm
    hidden_state: torch.Tensor | None  # (B, T, width), after the chosen layer; None when none was asked for
    pooled: torch.Tensor  # (B, width), final-LayerNorm state at the first end token
    projected: torch.Tensor | None  # (B, projection_dim), `pooled` through text_projection, when there is one


# Layers that allocate their parameters without initialising them: every value is overwritten by a checkpoint,
# and random initialisation of ViT-bigG's 700M parameters would take seconds (ComfyUI's comfy/ops.py does the same).
class _Linear(nn.Linear):
    def reset_parameters(self) -> None:
        return None


class _Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        return None


class _LayerNorm(nn.LayerNorm):
    def reset_parameters(self) -> None:
        return None


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig, device=None, dtype=None):
        super().__init__()
        self.heads = config.heads
        kw = dict(device=device, dtype=dtype)
        self.q_proj = _Linear(config.width, config.width, **kw)
        self.k_proj = _Linear(config.width, config.width, **kw)
        self.v_proj = _Linear(config.width, config.width, **kw)
        self.out_proj = _Linear(config.width, config.width, **kw)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, width)
        return self.out_proj(y)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig, device=None, dtype=None):
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {config.activation!r}")
        self.fc1 = _Linear(config.width, config.mlp_width, device=device, dtype=dtype)
        self.fc2 = _Linear(config.mlp_width, config.width, device=device, dtype=dtype)
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.layer_norm1 = _LayerNorm(config.width, eps=config.layer_norm_eps, **kw)
        self.self_attn = CLIPAttention(config, **kw)
        self.layer_norm2 = _LayerNorm(config.width, eps=config.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(config, **kw)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        x = x + self.mlp(self.layer_norm2(x))
        return x


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(config, device, dtype) for _ in range(config.layers))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig, device=None, dtype=None):
        super().__init__()
        self.token_embedding = _Embedding(config.vocab_size, config.width, device=device, dtype=dtype)
        self.position_embedding = _Embedding(config.max_positions, config.width, device=device, dtype=dtype)


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig, device=None, dtype=None):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config, device, dtype)
        self.encoder = CLIPEncoder(config, device, dtype)
        self.final_layer_norm = _LayerNorm(config.width, eps=config.layer_norm_eps, device=device, dtype=dtype)


class CLIPTextModel(nn.Module):
    def __init__(
        self, config: CLIPTextConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config, device, dtype)
        self.text_projection = (
            _Linear(config.width, config.projection_dim, bias=False, device=device, dtype=dtype)
            if config.projection_dim is not None
            else None
        )

    def embed(
        self, chunks: Sequence[Sequence[Union[int, torch.Tensor]]], pad_token: int = END_TOKEN
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids `(B, T)` and input embeddings `(B, T, width)` of rows of token ids and embedding vectors.

        A vector (textual inversion) takes the place of a token embedding; its id is a placeholder that never
        reads as the end token. A vector of the wrong width is dropped with a warning and the row is topped up
        with `pad_token` at its end, as ComfyUI does (so later positions shift left by one).
        """
        table = self.text_model.embeddings.token_embedding.weight
        width = table.shape[1]
        ids: list[list[int]] = []
        vectors: list[tuple[int, int, torch.Tensor]] = []  # (row, position, vector)
        for b, chunk in enumerate(chunks):
            row: list[int] = []
            for entry in chunk:
                if isinstance(entry, torch.Tensor):
                    if entry.shape[-1] != width:
                        logger.warning(
                            "an embedding %d wide does not fit a %d-wide text encoder, ignoring it",
                            entry.shape[-1], width,
                        )
                        continue
                    vectors.append((b, len(row), entry))
                    row.append(_PLACEHOLDER)
                else:
                    row.append(int(entry))
            ids.append(row + [pad_token] * (len(chunk) - len(row)))
        id_tensor = torch.tensor(ids, dtype=torch.long, device=table.device)
        embeds = F.embedding(id_tensor.clamp(min=0), table)  # (B, T, width)
        for b, position, vector in vectors:
            embeds[b, position] = vector.to(device=table.device, dtype=table.dtype)
        return id_tensor, embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        input_embeds: torch.Tensor | None = None,
        *,
        hidden_layer: int | None = None,
        normalize_hidden: bool = False,
    ) -> CLIPTextOutput:
        """Run the text transformer.

        `input_ids` (B, T) locate the end token for the pooled output and give the token embeddings unless
        `input_embeds` (B, T, width, from `embed`) is given. `hidden_layer` picks the layer whose output is
        returned as `hidden_state` (0-based; negative counts from the end, -1 being the last layer's output
        before the final LayerNorm); `normalize_hidden` passes it through the final LayerNorm.
        """
        tm = self.text_model
        n_layers = len(tm.encoder.layers)
        if hidden_layer is not None and not -n_layers <= hidden_layer < n_layers:
            raise ValueError(
                f"hidden_layer must be in [{-n_layers}, {n_layers - 1}] for a {n_layers}-layer model,"
                f" got {hidden_layer}"
            )
        if input_embeds is None:
            input_embeds = tm.embeddings.token_embedding(input_ids)
        T = input_ids.shape[1]
        x = input_embeds.to(tm.embeddings.position_embedding.weight.dtype) + tm.embeddings.position_embedding.weight[:T]
        # Causal mask as an additive bias with the dtype's most negative finite value, as ComfyUI builds it.
        mask = torch.full((T, T), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)
        stop = None if hidden_layer is None else hidden_layer % n_layers
        hidden = None
        for i, layer in enumerate(tm.encoder.layers):
            x = layer(x, mask)
            if i == stop:
                hidden = x
        x = tm.final_layer_norm(x)
        if hidden is not None and normalize_hidden:
            hidden = tm.final_layer_norm(hidden)
        eos = (input_ids == self.config.end_token).int().argmax(dim=-1)  # first end token (0 when none)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos]  # (B, width)
        projected = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPTextOutput(x, hidden, pooled, projected)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint layouts


class ClipCheckpointError(ValueError):
    """A text-encoder checkpoint lacks a tensor or has one of the wrong shape; `key` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


# OpenCLIP names (relative to the prefix) -> Hugging Face names; the fused in_proj and the transposed
# text_projection are handled beside the map.
_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPENCLIP_LAYER = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_OPENCLIP_FUSED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}  # rows: q, k, v
# Tensors that checkpoints carry and inference does not use.
_IGNORED = re.compile(r"^(logit_scale|attn_mask|text_model\.embeddings\.position_ids|embeddings\.position_ids)$")
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def convert_clip_state_dict(
    sd: Mapping[str, torch.Tensor],
    prefix: str,
    *,
    heads: int | None = None,
    activation: str | None = None,
) -> tuple[dict[str, torch.Tensor], CLIPTextConfig]:
    """The text encoder under `prefix` in `CLIPTextModel`'s names, and its configuration.

    Accepts the Hugging Face layout (`{prefix}text_model.…`, or the older `{prefix}embeddings.…` without
    `text_model.`) and the OpenCLIP layout (`{prefix}token_embedding.weight`, `positional_embedding`,
    `transformer.resblocks.N.…` with a fused `attn.in_proj_*`, `ln_final`, and `text_projection` stored as a
    `[width, projection]` matrix). Every tensor the model needs is checked for presence and shape. `heads` and
    `activation` override what `detect_clip_config` would infer (for models other than the three SD encoders).
    """
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    openclip = False
    if "text_model.embeddings.token_embedding.weight" in sub:
        out, sources, unused = _from_hf(sub, lambda k: k)
    elif "embeddings.token_embedding.weight" in sub:
        out, sources, unused = _from_hf(sub, _legacy_hf_name)
    elif "token_embedding.weight" in sub:
        out, sources, unused = _from_openclip(sub)
        openclip = True
    else:
        raise ClipCheckpointError(
            f"{prefix}text_model.embeddings.token_embedding.weight",
            "no CLIP text encoder under this prefix (looked for the Hugging Face and the OpenCLIP layouts)",
        )
    unused = [k for k in unused if not _IGNORED.match(k)]
    if unused:
        logger.warning(
            "ignoring %d unexpected text-encoder tensors under %s: %s",
            len(unused), prefix, ", ".join(sorted(unused)[:8]),
        )
    config = detect_clip_config(out, openclip_layout=openclip, heads=heads, activation=activation)
    return _check_shapes(out, config, {k: prefix + v for k, v in sources.items()}, prefix), config


def detect_clip_config(
    converted: Mapping[str, torch.Tensor],
    *,
    openclip_layout: bool = False,
    heads: int | None = None,
    activation: str | None = None,
) -> CLIPTextConfig:
    """The configuration of a converted state dict, from its shapes.

    Heads are `width // 64` in all three SD encoders. The activation is GELU for OpenCLIP's models and
    quick-GELU for OpenAI's CLIP-L: GELU when the source was in the OpenCLIP layout, or when its width is
    ViT-H's 1024 or ViT-bigG's 1280 (these also ship as Hugging Face-layout files, e.g. SDXL's `clip_g`),
    quick-GELU otherwise. ComfyUI reaches the same choice through its per-family configs.
    """
    token = _require(converted, "text_model.embeddings.token_embedding.weight", ndim=2)
    position = _require(converted, "text_model.embeddings.position_embedding.weight", ndim=2)
    fc1 = _require(converted, "text_model.encoder.layers.0.mlp.fc1.weight", ndim=2)
    vocab_size, width = token.shape
    layer_ids = {int(m.group(1)) for k in converted if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    projection = converted.get("text_projection.weight")
    if activation is None:
        activation = "gelu" if openclip_layout or width in (1024, 1280) else "quick_gelu"
    if heads is None:
        heads = max(width // 64, 1)
    if width % heads:
        raise ClipCheckpointError(
            "text_model.embeddings.token_embedding.weight", f"width {width} is not divisible by {heads} heads"
        )
    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_positions=position.shape[0],
        width=width,
        layers=max(layer_ids) + 1,
        heads=heads,
        mlp_width=fc1.shape[0],
        activation=activation,
        projection_dim=None if projection is None else projection.shape[0],
    )


def load_clip(
    sd: Mapping[str, torch.Tensor],
    prefix: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    round_to: torch.dtype | None = None,
    heads: int | None = None,
    activation: str | None = None,
) -> CLIPTextModel:
    """Convert, build on the meta device and load: a ready `CLIPTextModel` in `dtype` on `device`.

    `round_to` first rounds every weight through that dtype. ComfyUI stores text encoders in float16 and computes
    in float32 (comfy/ops.py `manual_cast`), so `dtype=float32, round_to=float16` reproduces its numbers for a
    float32 checkpoint.
    """
    converted, config = convert_clip_state_dict(sd, prefix, heads=heads, activation=activation)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    tensors = {}
    for name, tensor in converted.items():
        if round_to is not None:
            tensor = tensor.to(round_to)
        tensors[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _legacy_hf_name(key: str) -> str:
    return key if key.startswith("text_projection") else "text_model." + key


# Each converter returns (tensors by model name, checkpoint name of each, checkpoint names left unused).
Converted = tuple[dict[str, torch.Tensor], dict[str, str], list[str]]
_HF_WANTED = re.compile(
    r"^(text_model\.(embeddings\.(token|position)_embedding\.|encoder\.layers\.\d+\.|final_layer_norm\.)"
    r"|text_projection\.weight$)"
)


def _from_hf(sub: Mapping[str, torch.Tensor], rename: Callable[[str], str]) -> Converted:
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unused: list[str] = []
    for key, tensor in sub.items():
        name = rename(key)
        if _HF_WANTED.match(name):
            out[name], sources[name] = tensor, key
        else:
            unused.append(name)
    return out, sources, unused


def _from_openclip(sub: Mapping[str, torch.Tensor]) -> Converted:
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unused: list[str] = []
    for key, tensor in sub.items():
        block = _RESBLOCK.match(key)
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]], sources[_OPENCLIP_TOP[key]] = tensor, key
        elif key == "text_projection":
            out["text_projection.weight"] = tensor.t().contiguous()  # x @ P  ==  Linear with weight P^T
            sources["text_projection.weight"] = key
        elif block and block.group(2) in _OPENCLIP_LAYER:
            name = f"text_model.encoder.layers.{block.group(1)}.{_OPENCLIP_LAYER[block.group(2)]}"
            out[name], sources[name] = tensor, key
        elif block and block.group(2) in _OPENCLIP_FUSED:
            if tensor.ndim == 0 or tensor.shape[0] % 3:
                raise ClipCheckpointError(
                    key, f"a fused q/k/v tensor needs a first dimension divisible by 3, got {tuple(tensor.shape)}"
                )
            suffix = _OPENCLIP_FUSED[block.group(2)]
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                name = f"text_model.encoder.layers.{block.group(1)}.self_attn.{proj}.{suffix}"
                out[name], sources[name] = part, key
        else:
            unused.append(key)
    return out, sources, unused


def _require(sd: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    if key not in sd:
        raise ClipCheckpointError(key, "missing from the text-encoder checkpoint")
    if sd[key].ndim != ndim:
        raise ClipCheckpointError(key, f"expected a {ndim}-D tensor, got shape {tuple(sd[key].shape)}")
    return sd[key]


def _check_shapes(
    converted: Mapping[str, torch.Tensor], config: CLIPTextConfig, sources: Mapping[str, str], prefix: str
) -> dict[str, torch.Tensor]:
    """Exactly the model's tensors, each checked against the shape the detected configuration gives it."""
    with torch.device("meta"):
        expected = CLIPTextModel(config).state_dict()
    for key, want in expected.items():
        if key not in converted:
            raise ClipCheckpointError(key, f"missing from the text-encoder checkpoint under {prefix!r}")
        if converted[key].shape != want.shape:
            raise ClipCheckpointError(
                key, f"expected shape {tuple(want.shape)}, got {tuple(converted[key].shape)} from {sources[key]}"
            )
    extra = sorted(set(converted) - set(expected))
    if extra:
        logger.warning("ignoring %d text-encoder tensors the model does not have: %s", len(extra), ", ".join(extra[:8]))
    return {key: converted[key] for key in expected}
