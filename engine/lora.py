"""LoRA files: reading them, finding which layer of a loaded checkpoint each entry patches, and the weight deltas.

Scope: the adapters ComfyUI applies to Stable Diffusion 1.x/2.x/XL checkpoints, with its formulas
(comfy/weight_adapter/{lora,loha,lokr,base}.py, comfy/lora.py `load_lora` and `calculate_weight`). With W the
float32 weight, s the node's strength, a the file's `.alpha` (scale = a / rank, 1 without alpha):

- LoRA / LoCon: W += s * scale * (up.flatten(1) @ down.flatten(1)).reshape(W.shape); a conv LoCon with a
  `lora_mid` first folds the mid kernel into `down` (rank x in x kh x kw, ComfyUI's Tucker arrangement).
- LoHa: W += s * scale * ((w1_a @ w1_b) * (w2_a @ w2_b)); with `hada_t1/t2` each factor is the Tucker product
  einsum("ijkl,jr,ip->prkl", t, w_b, w_a). rank = w1_b.shape[0].
- LoKr: W += s * scale * kron(w1, w2), w1 = lokr_w1 or w1_a @ w1_b, w2 = lokr_w2, w2_a @ w2_b or the Tucker
  product with lokr_t2 (w1 gets two unit dimensions when w2 is a conv kernel); scale = a / rank of the last
  factor given in parts (w2's, else w1's), and 1 when both are given whole.
- DoRA (`dora_scale`, any of the above): ComfyUI's `weight_decompose`: W' = W + scale * delta, normalised
  column- or row-wise (by the axis `dora_scale` matches; on the output axis ComfyUI divides by the norm of the
  unpatched W) and multiplied by dora_scale; strength s blends W + s * (W'' - W).
- `diff` / `diff_b` / `w_norm` / `b_norm`: W += s * diff (skipped at strength 0); `set_weight`: W = value.

Key names, as ComfyUI's `model_lora_keys_unet` / `model_lora_keys_clip` map them:
- UNet: kohya `lora_unet_<path with _>` over the original (ldm) module paths and over the diffusers module paths
  (mapped back to ldm paths as comfy/utils.py `unet_to_diffusers`), `lycoris_<diffusers path>`, diffusers'
  attention-processor names (`[unet.]…attn1.processor.to_q`), plain `diffusion_model.<ldm path>`. Beyond
  ComfyUI: plain diffusers/PEFT module paths (`[unet.]down_blocks.0.…attn1.to_q`, as diffusers >= 0.22 saves
  them), which ComfyUI ignores with "lora key not loaded".
- Text: `lora_te_` / `lora_te1_` / `text_encoder.` for the first encoder, `lora_te2_` / `text_encoder_2.` for
  SDXL's bigG (the refiner's lone bigG takes `lora_te_`), over the six linear layers of each transformer layer;
  `text_encoders.<clip_l|clip_h|clip_g>.transformer.<path>`; `lora_te2_text_projection` (bigG's projection).
- Entry suffixes: `.lora_up/.lora_down/.lora_mid.weight`, `_lora.up/_lora.down.weight`, `.lora_B/.lora_A.weight`,
  `.lora.up/.lora.down.weight`, `.lora_linear_layer.up/down.weight`, `.lora_B/.lora_A`, `.lora_B/A.default.weight`,
  `.alpha`, `.dora_scale`, `.hada_*`, `.lokr_*`, `.diff`, `.diff_b`, `.w_norm`, `.b_norm`, `.set_weight`.

Text encoders: ComfyUI stores them in float16, so their patched weights are rounded through float16
(`PatchSet.round_to`), as our loader rounds their unpatched weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from engine.errors import BadRequest, EngineError
from engine.models.unet import UNetConfig
from engine.patching import PatchSet, WeightPatch

log = logging.getLogger(__name__)

TEXT_ROUND_TO = torch.float16  # ComfyUI's storage dtype for text encoders (model_management.text_encoder_dtype)


class LoraError(BadRequest):
    """A LoRA file that cannot be read or that fits nothing in the checkpoint it is applied to; names the file."""


# -- reading ----------------------------------------------------------------------------------------------------------

def read_lora(path: Path) -> dict[str, Tensor]:
    """The tensors of a `.safetensors` LoRA, or of a pickled `.ckpt`/`.pt`/`.pth`/`.bin` read with
    `weights_only=True` (a nested `state_dict` is unwrapped, as ComfyUI's `load_torch_file` does)."""
    try:
        if path.suffix.lower() in (".safetensors", ".sft"):
            from safetensors.torch import load_file
            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and pickle raise many types for a damaged or foreign file
        raise LoraError(f"LoRA {path.name} could not be read: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LoraError(f"LoRA {path.name} holds a {type(data).__name__}, not a dictionary of tensors")
    return {k: v for k, v in data.items() if isinstance(v, Tensor)}


# -- weight deltas ----------------------------------------------------------------------------------------------------

def _f32(tensor: Tensor, device: torch.device) -> Tensor:
    return tensor.to(device=device, dtype=torch.float32)


def _tucker(t: Tensor, w_b: Tensor, w_a: Tensor) -> Tensor:
    """A conv-kernel factor from its Tucker core (LyCORIS' CP decomposition)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)


def weight_decompose(dora_scale: Tensor, weight: Tensor, delta: Tensor, scale: float, strength: float) -> Tensor:
    """DoRA (Liu et al. 2024) as ComfyUI's `weight_decompose`, operation for operation (float32 throughout)."""
    dora_scale = _f32(dora_scale, weight.device)
    delta *= scale
    weight_calc = weight + delta
    ones = [1] * (weight.dim() - 1)
    if dora_scale.shape[0] == weight_calc.shape[0]:
        # ComfyUI normalises by the unpatched weight on this axis
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *ones)
    else:
        norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(weight_calc.shape[1], *ones).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    weight_calc *= dora_scale / norm
    if strength != 1.0:
        weight_calc -= weight
        weight += strength * weight_calc
    else:
        weight[:] = weight_calc
    return weight


class _LowRank(WeightPatch):
    """An adapter whose delta is a product of factors, scaled by alpha / rank, optionally DoRA-decomposed."""
    alpha: float | None
    dora_scale: Tensor | None

    def delta(self, device: torch.device) -> tuple[Tensor, float]:
        """The unscaled float32 delta (a new tensor of any shape with the weight's element count) and its scale."""
        raise NotImplementedError

    def update(self, weight: Tensor, strength: float) -> Tensor:
        delta, scale = self.delta(weight.device)
        delta = delta.reshape(weight.shape)
        if self.dora_scale is not None:
            return weight_decompose(self.dora_scale, weight, delta, scale, strength)
        # ComfyUI's `weight += (strength * alpha) * lora_diff`, the product taken in place (same roundings)
        weight += delta.mul_(strength * scale)
        return weight


@dataclass(eq=False)
class LoRAPatch(_LowRank):
    up: Tensor  # (out, rank[, 1, 1])
    down: Tensor  # (rank, in[, kh, kw]), or (rank, in, 1, 1) with a mid kernel
    alpha: float | None = None
    mid: Tensor | None = None  # (rank, rank, kh, kw): LoCon's Tucker core
    dora_scale: Tensor | None = None

    def delta(self, device: torch.device) -> tuple[Tensor, float]:
        up, down = _f32(self.up, device), _f32(self.down, device)
        scale = self.alpha / down.shape[0] if self.alpha is not None else 1.0
        if self.mid is not None:
            mid = _f32(self.mid, device)
            shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1)) \
                .reshape(shape).transpose(0, 1)  # (rank, in, kh, kw)
        return torch.mm(up.flatten(1), down.flatten(1)), scale


@dataclass(eq=False)
class LoHaPatch(_LowRank):
    w1_a: Tensor
    w1_b: Tensor
    w2_a: Tensor
    w2_b: Tensor
    alpha: float | None = None
    t1: Tensor | None = None
    t2: Tensor | None = None
    dora_scale: Tensor | None = None

    def delta(self, device: torch.device) -> tuple[Tensor, float]:
        w1_a, w1_b, w2_a, w2_b = (_f32(t, device) for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b))
        scale = self.alpha / w1_b.shape[0] if self.alpha is not None else 1.0
        if self.t1 is not None:
            m1 = _tucker(_f32(self.t1, device), w1_b, w1_a)
            m2 = _tucker(_f32(self.t2, device), w2_b, w2_a)
        else:
            m1, m2 = torch.mm(w1_a, w1_b), torch.mm(w2_a, w2_b)
        return m1 * m2, scale


@dataclass(eq=False)
class LoKrPatch(_LowRank):
    w1: Tensor | None = None
    w2: Tensor | None = None
    alpha: float | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    t2: Tensor | None = None
    dora_scale: Tensor | None = None

    def delta(self, device: torch.device) -> tuple[Tensor, float]:
        rank = None
        if self.w1 is not None:
            w1 = _f32(self.w1, device)
        else:
            rank = self.w1_b.shape[0]
            w1 = torch.mm(_f32(self.w1_a, device), _f32(self.w1_b, device))
        if self.w2 is not None:
            w2 = _f32(self.w2, device)
        else:
            rank = self.w2_b.shape[0]
            if self.t2 is None:
                w2 = torch.mm(_f32(self.w2_a, device), _f32(self.w2_b, device))
            else:
                w2 = _tucker(_f32(self.t2, device), _f32(self.w2_b, device), _f32(self.w2_a, device))
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]  # (a, b, 1, 1): kron then spreads w2's kernel over each entry of w1
        scale = self.alpha / rank if self.alpha is not None and rank is not None else 1.0
        return torch.kron(w1, w2), scale


@dataclass(eq=False)
class DiffPatch(WeightPatch):
    """A full-weight difference (`.diff`, `.diff_b`, `.w_norm`, `.b_norm`): W += strength * diff."""
    diff: Tensor

    def update(self, weight: Tensor, strength: float) -> Tensor:
        if self.diff.shape != weight.shape:
            raise ValueError(f"a diff of shape {tuple(self.diff.shape)} for a weight of shape {tuple(weight.shape)}")
        if strength != 0.0:
            weight += strength * _f32(self.diff, weight.device)
        return weight


@dataclass(eq=False)
class SetPatch(WeightPatch):
    """`.set_weight`: the weight replaced outright (ComfyUI ignores the strength)."""
    value: Tensor

    def update(self, weight: Tensor, strength: float) -> Tensor:
        if self.value.shape != weight.shape:
            raise ValueError(f"a value of shape {tuple(self.value.shape)} for a weight of shape "
                             f"{tuple(weight.shape)}")
        weight.copy_(self.value)
        return weight


# -- which layer each entry patches -----------------------------------------------------------------------------------

# ComfyUI's comfy/utils.py tables: ldm names inside a ResBlock / SpatialTransformer / transformer block, and the
# top-level layers, with their diffusers names.
_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
           "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_ATTENTION = ("proj_in", "proj_out", "norm")
_TRANSFORMER = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_BASIC = {"class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
          "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
          "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}


def diffusers_unet_modules(config: UNetConfig) -> dict[str, str]:
    """Diffusers module path -> original (ldm) module path for every layer of a UNet of this configuration, as
    ComfyUI's `unet_to_diffusers` (which lists some layers a configuration does not have; callers filter)."""
    out: dict[str, str] = {}
    depth = iter(config.transformer_depth)
    for level, blocks in enumerate(config.num_res_blocks):
        n = 1 + (blocks + 1) * level  # input_blocks index of the level's first ResBlock
        for i in range(blocks):
            out.update({f"down_blocks.{level}.resnets.{i}.{d}": f"input_blocks.{n}.0.{o}" for o, d in _RESNET.items()})
            transformers = next(depth)
            if transformers > 0:
                out.update({f"down_blocks.{level}.attentions.{i}.{a}": f"input_blocks.{n}.1.{a}" for a in _ATTENTION})
                out.update({f"down_blocks.{level}.attentions.{i}.transformer_blocks.{t}.{b}":
                            f"input_blocks.{n}.1.transformer_blocks.{t}.{b}"
                            for t in range(transformers) for b in _TRANSFORMER})
            n += 1
        out[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    out.update({f"mid_block.attentions.0.{a}": f"middle_block.1.{a}" for a in _ATTENTION})
    out.update({f"mid_block.attentions.0.transformer_blocks.{t}.{b}": f"middle_block.1.transformer_blocks.{t}.{b}"
                for t in range(config.transformer_depth_middle or 0) for b in _TRANSFORMER})
    for i, n in enumerate((0, 2)):
        out.update({f"mid_block.resnets.{i}.{d}": f"middle_block.{n}.{o}" for o, d in _RESNET.items()})
    depth_output = list(config.transformer_depth_output)
    for level, blocks in enumerate(reversed(config.num_res_blocks)):
        n = (blocks + 1) * level  # output_blocks index of the level's first block
        for i in range(blocks + 1):
            out.update({f"up_blocks.{level}.resnets.{i}.{d}": f"output_blocks.{n}.0.{o}" for o, d in _RESNET.items()})
            layer = 1
            transformers = depth_output.pop()
            if transformers > 0:
                layer = 2
                out.update({f"up_blocks.{level}.attentions.{i}.{a}": f"output_blocks.{n}.1.{a}" for a in _ATTENTION})
                out.update({f"up_blocks.{level}.attentions.{i}.transformer_blocks.{t}.{b}":
                            f"output_blocks.{n}.1.transformer_blocks.{t}.{b}"
                            for t in range(transformers) for b in _TRANSFORMER})
            if i == blocks:
                out[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{n}.{layer}.conv"
            n += 1
    out.update(_BASIC)
    return out


def unet_key_map(unet: nn.Module) -> dict[str, str]:
    """LoRA module name -> UNet parameter name, for every name ComfyUI accepts (and plain diffusers paths)."""
    params = dict(unet.named_parameters())
    names: dict[str, str] = {}
    for key in params:
        if key.endswith(".weight"):
            names["lora_unet_" + key[:-len(".weight")].replace(".", "_")] = key
            names["diffusion_model." + key[:-len(".weight")]] = key
        else:
            names["diffusion_model." + key] = key
    for diffusers, ldm in diffusers_unet_modules(unet.config).items():
        key = ldm + ".weight"
        if key not in params:
            continue
        flat = diffusers.replace(".", "_")
        names["lora_unet_" + flat] = key
        names["lycoris_" + flat] = key
        for prefix in ("", "unet."):
            processor = prefix + diffusers.replace(".to_", ".processor.to_")
            names[processor[:-2] if processor.endswith(".to_out.0") else processor] = key
        for prefix in ("", "unet."):
            names.setdefault(prefix + diffusers, key)
    return names


_CLIP_LAYERS = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                "self_attn.out_proj": "self_attn_out_proj"}


@dataclass(frozen=True)
class _TextNames:
    comfy: str  # ComfyUI's name for the encoder (its generic `text_encoders.<name>.transformer.` format)
    kohya: tuple[str, ...]  # prefixes of `<prefix>text_model_encoder_layers_N_<layer>`
    diffusers: tuple[str, ...]  # prefixes of `<prefix>text_model.encoder.layers.N.<layer>`
    projection: tuple[str, ...] = ()  # names of the text projection


# The text encoders of each family, in the checkpoint's order (targets text0, text1).
TEXT_ENCODERS: dict[str, tuple[_TextNames, ...]] = {
    "sd1": (_TextNames("clip_l", ("lora_te_", "lora_te1_"), ("text_encoder.",), ("lora_te1_text_projection",)),),
    "sd2": (_TextNames("clip_h", ("lora_te_", "lora_te1_"), ("text_encoder.",)),),
    "sdxl": (_TextNames("clip_l", ("lora_te_", "lora_te1_"), ("text_encoder.",), ("lora_te1_text_projection",)),
             _TextNames("clip_g", ("lora_te2_",), ("text_encoder_2.",),
                        ("lora_prior_te_text_projection", "lora_te2_text_projection"))),
    "sdxl_refiner": (_TextNames("clip_g", ("lora_te_", "lora_prior_te_"), ("text_encoder.",),
                                ("lora_prior_te_text_projection", "lora_te2_text_projection")),),
}


def text_key_map(names: _TextNames, text_model: nn.Module) -> dict[str, str]:
    """LoRA module name -> parameter name of one CLIPTextModel."""
    params = dict(text_model.named_parameters())
    out = {f"text_encoders.{names.comfy}.transformer.{k[:-len('.weight')]}": k for k in params if k.endswith(".weight")}
    layer = 0
    while f"text_model.encoder.layers.{layer}.mlp.fc1.weight" in params:
        for path, flat in _CLIP_LAYERS.items():
            key = f"text_model.encoder.layers.{layer}.{path}.weight"
            for prefix in names.kohya:
                out[f"{prefix}text_model_encoder_layers_{layer}_{flat}"] = key
            for prefix in names.diffusers:
                out[f"{prefix}text_model.encoder.layers.{layer}.{path}"] = key
        layer += 1
    if "text_projection.weight" in params:
        out.update({name: "text_projection.weight" for name in names.projection})
    return out


# -- matching a file against the networks -----------------------------------------------------------------------------

# (suffix of the `up` entry, suffix of the `down` entry, suffix of the LoCon mid kernel or None), ComfyUI's order
_LORA_NAMES = ((".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
               ("_lora.up.weight", "_lora.down.weight", None),
               (".lora_B.weight", ".lora_A.weight", None),
               (".lora.up.weight", ".lora.down.weight", None),
               (".lora_B", ".lora_A", None),
               (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
               (".lora_B.default.weight", ".lora_A.default.weight", None))
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_SUFFIXES = tuple({s for names in _LORA_NAMES for s in names if s} |
                  {"." + n for n in _LOHA + _LOKR} |
                  {".alpha", ".dora_scale", ".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight"})
_TEXT_PREFIXES = ("lora_te", "text_encoder", "lora_prior_te")
_LOGGED_KEYS = 100


@dataclass(frozen=True)
class Lora:
    """A LoRA file matched against one checkpoint's networks: the patch of each parameter it changes."""
    name: str
    patches: dict[str, dict[str, WeightPatch]]  # target -> parameter name -> patch
    unmatched: tuple[str, ...]  # keys of the file that changed nothing

    def patch_set(self, target: str, strength: float) -> PatchSet:
        entries = tuple((param, patch, float(strength)) for param, patch in self.patches.get(target, {}).items())
        return PatchSet(target, entries, TEXT_ROUND_TO if target.startswith("text") else None)


def match_lora(sd: Mapping[str, Tensor], networks: Mapping[str, nn.Module], family: str, name: str) -> Lora:
    """Match the tensors of LoRA file `name` against `networks` ("unet": UNetModel, "text0"/"text1": the family's
    CLIPTextModels). Raises LoraError when nothing matches; logs the keys that did not."""
    key_map: dict[str, tuple[str, str]] = {}
    if "unet" in networks:
        key_map.update({k: ("unet", p) for k, p in unet_key_map(networks["unet"]).items()})
    encoders = TEXT_ENCODERS.get(family, ())
    for index, names in enumerate(encoders):
        if f"text{index}" in networks:
            key_map.update({k: (f"text{index}", p) for k, p in text_key_map(names, networks[f"text{index}"]).items()})

    found, loaded = _read_patches(sd, key_map)
    params = {target: dict(module.named_parameters()) for target, module in networks.items()}
    patches: dict[str, dict[str, WeightPatch]] = {}
    misfits = []
    for (target, param), patch in found.items():
        weight = params[target].get(param)
        if weight is not None and _fits(patch, weight.shape):
            patches.setdefault(target, {})[param] = patch
        else:
            misfits.append(f"{target} {param}" + (f" {tuple(weight.shape)}" if weight is not None else " (absent)"))
    if misfits:  # ComfyUI logs these too and leaves the weights as they are
        log.warning("LoRA %s: %d patches do not fit the shape of their weight and were not applied: %s%s", name,
                    len(misfits), ", ".join(misfits[:_LOGGED_KEYS]), _more(misfits))
    unmatched = tuple(k for k in sd if k not in loaded)
    if not patches:
        raise LoraError(f"LoRA {name} matches nothing in this {family} checkpoint's "
                        f"{' and '.join(_describe(t) for t in networks)}: none of its {len(sd)} keys (e.g. "
                        f"{', '.join(sorted(sd)[:3]) or 'none'}) names one of their layers with a supported "
                        "adapter (LoRA/LoCon, LoHa, LoKr, DoRA, diff); is it a LoRA for another model family?")
    _log_unmatched(name, unmatched, networks)
    return Lora(name, patches, unmatched)


def _read_patches(sd: Mapping[str, Tensor], key_map: Mapping[str, tuple[str, str]]
                  ) -> tuple[dict[tuple[str, str], WeightPatch], set[str]]:
    """ComfyUI's `load_lora` over the module names present in the file, in the key map's order: later adapters
    and full-weight entries for the same parameter replace earlier ones."""
    stems = {key[:-len(suffix)] for key in sd for suffix in _SUFFIXES if key.endswith(suffix)}
    found: dict[tuple[str, str], WeightPatch] = {}
    loaded: set[str] = set()

    def take(key: str) -> Tensor | None:
        if key in sd:
            loaded.add(key)
            return sd[key]
        return None

    for stem, (target, param) in key_map.items():
        if stem not in stems:
            continue
        alpha_tensor = take(stem + ".alpha")
        alpha = alpha_tensor.item() if alpha_tensor is not None else None
        dora_scale = take(stem + ".dora_scale")
        for reader in (_read_lora, _read_loha, _read_lokr):
            patch = reader(stem, sd, take, alpha, dora_scale)
            if patch is not None:
                found[(target, param)] = patch
        bias = param[:-len(".weight")] + ".bias"
        if stem + ".w_norm" in sd:
            found[(target, param)] = DiffPatch(take(stem + ".w_norm"))
            if stem + ".b_norm" in sd:
                found[(target, bias)] = DiffPatch(take(stem + ".b_norm"))
        if stem + ".diff" in sd:
            found[(target, param)] = DiffPatch(take(stem + ".diff"))
        if stem + ".diff_b" in sd:
            found[(target, bias)] = DiffPatch(take(stem + ".diff_b"))
        if stem + ".set_weight" in sd:
            found[(target, param)] = SetPatch(take(stem + ".set_weight"))
    return found, loaded


Take = Callable[[str], "Tensor | None"]


def _read_lora(stem: str, sd: Mapping[str, Tensor], take: Take, alpha, dora_scale) -> WeightPatch | None:
    for up, down, mid in _LORA_NAMES:
        if stem + up in sd:
            return LoRAPatch(take(stem + up), take(stem + down), alpha, take(stem + mid) if mid else None, dora_scale)
    return None


def _read_loha(stem: str, sd: Mapping[str, Tensor], take: Take, alpha, dora_scale) -> WeightPatch | None:
    if stem + ".hada_w1_a" not in sd:
        return None
    w1_a, w1_b, w2_a, w2_b = (take(f"{stem}.{n}") for n in _LOHA[:4])
    t1 = t2 = None
    if stem + ".hada_t1" in sd:
        t1, t2 = take(stem + ".hada_t1"), take(stem + ".hada_t2")
    return LoHaPatch(w1_a, w1_b, w2_a, w2_b, alpha, t1, t2, dora_scale)


def _read_lokr(stem: str, sd: Mapping[str, Tensor], take: Take, alpha, dora_scale) -> WeightPatch | None:
    parts = {n: take(f"{stem}.{n}") for n in _LOKR}
    if all(parts[n] is None for n in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
        return None
    return LoKrPatch(parts["lokr_w1"], parts["lokr_w2"], alpha, parts["lokr_w1_a"], parts["lokr_w1_b"],
                     parts["lokr_w2_a"], parts["lokr_w2_b"], parts["lokr_t2"], dora_scale)


def _fits(patch: WeightPatch, shape: torch.Size) -> bool:
    """Whether the patch computes for a weight of this shape: the real computation, run on the meta device."""
    try:
        patch.update(torch.empty(shape, dtype=torch.float32, device="meta"), 1.0)
    except (RuntimeError, ValueError, TypeError, AttributeError, EngineError):
        return False
    return True


def _describe(target: str) -> str:
    return "UNet" if target == "unet" else f"text encoder {target[4:]}"


def _log_unmatched(name: str, unmatched: tuple[str, ...], networks: Mapping[str, nn.Module]) -> None:
    if not unmatched:
        return
    if not any(t.startswith("text") for t in networks):  # a model-only loader leaves the text encoder's entries
        text = [k for k in unmatched if k.startswith(_TEXT_PREFIXES)]
        if text:
            log.info("LoRA %s: %d text-encoder keys not applied (its CLIP is not patched)", name, len(text))
        unmatched = tuple(k for k in unmatched if not k.startswith(_TEXT_PREFIXES))
    if unmatched:
        log.warning("LoRA %s: %d keys match no layer and were not applied: %s%s", name, len(unmatched),
                    ", ".join(unmatched[:_LOGGED_KEYS]), _more(unmatched))


def _more(names) -> str:
    return f" and {len(names) - _LOGGED_KEYS} more" if len(names) > _LOGGED_KEYS else ""
