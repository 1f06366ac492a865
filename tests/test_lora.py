"""LoRA: each adapter against a direct computation of its formula on tiny checkpoints, key formats against each
other and against diffusers' own converters, exact patch/restore, and the loader nodes end to end."""
from __future__ import annotations

import io
import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.checkpoints import load_checkpoint
from engine.context import NodeContext
from engine.devices import policy_for
from engine.errors import NotFound
from engine.folders import Folders
from engine.lora import (LoraError, LoRAPatch, diffusers_unet_modules, match_lora, read_lora, unet_key_map)
from engine.models.unet import UNetConfig, UNetModel
from engine.patching import PatchConflict, PatchSet, WeightPatch, applied_patches, patched, unpatch
from engine.registry import default_registry
from engine.settings import Settings
from engine.text.handle import build_encoder
from nodes.lora import LoraLoader, LoraLoaderModelOnly
from tests.tiny_models import FAMILIES, checkpoint_state_dict, write_checkpoint

CPU = torch.device("cpu")
ATTN = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # a Linear in both tiny UNet layouts
SDXL_ATTN = "input_blocks.3.1.transformer_blocks.0.attn2.to_k"  # the tiny SDXL's first attention is at level 1
CONV3 = "input_blocks.1.0.in_layers.2"  # a 3x3 conv (ResBlock conv1)
FC1 = "text_model.encoder.layers.1.mlp.fc1"


def kohya(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def rand(generator: torch.Generator, *shape: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * scale


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    for family in ("sd1", "sdxl"):
        write_checkpoint(folder, family)
    return folder


def networks(files: Path, family: str) -> dict[str, torch.nn.Module]:
    """A tiny checkpoint as the real loader builds it (text encoders hold float16-rounded float32 weights)."""
    loaded = load_checkpoint(files / f"tiny_{family}.safetensors", policy_for(CPU))
    return {"unet": loaded.unet, **{f"text{i}": m for i, m in enumerate(loaded.text_models)}}


@pytest.fixture
def sd1(files):
    return networks(files, "sd1")


@pytest.fixture
def sdxl(files):
    return networks(files, "sdxl")


def weight(nets, target: str, path: str) -> torch.Tensor:
    return dict(nets[target].named_parameters())[path + ".weight"].detach().clone()


def apply(nets, sd, family="sd1", strength=1.0, name="test.safetensors"):
    """Match and apply a LoRA state dict; returns the Lora (the networks stay patched)."""
    lora = match_lora(sd, nets, family, name)
    sets = [lora.patch_set(t, strength) for t in lora.patches]
    with patched(nets, sets):
        pass
    return lora


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# -- each adapter against its formula ---------------------------------------------------------------------------------

def test_kohya_lora_with_alpha_is_w_plus_scaled_up_down(sd1):
    g = torch.Generator().manual_seed(1)
    w0 = weight(sd1, "unet", ATTN)
    up, down = rand(g, w0.shape[0], 4), rand(g, 4, w0.shape[1])
    apply(sd1, {kohya(ATTN) + ".lora_up.weight": up, kohya(ATTN) + ".lora_down.weight": down,
                kohya(ATTN) + ".alpha": torch.tensor(2.0)}, strength=0.7)
    expected = w0.double() + 0.7 * (2.0 / 4) * (up.double() @ down.double())
    err = max_err(weight(sd1, "unet", ATTN), expected)
    assert err < 1e-6, f"max abs error {err}"  # observed 2.4e-8 (float32 rounding)


def test_lora_without_alpha_has_scale_one_and_text_weights_round_through_float16(sd1):
    g = torch.Generator().manual_seed(2)
    w0 = weight(sd1, "text0", FC1)
    up, down = rand(g, w0.shape[0], 3), rand(g, 3, w0.shape[1])
    name = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    apply(sd1, {name + ".lora_up.weight": up, name + ".lora_down.weight": down})
    got = weight(sd1, "text0", FC1)
    expected = (w0.double() + up.double() @ down.double()).float()
    assert torch.equal(got, got.half().float())  # stored as ComfyUI stores text encoders: float16 values
    err = max_err(got, expected)
    assert err <= 2e-3 * expected.abs().max().item(), f"max abs error {err}"  # one float16 rounding (observed 1.2e-4)


def test_locon_conv_lora_and_tucker_mid_act_like_the_convolutions_they_factor(sd1):
    g = torch.Generator().manual_seed(3)
    w0 = weight(sd1, "unet", CONV3)  # (out, in, 3, 3)
    out_ch, in_ch = w0.shape[:2]
    up, mid, down = rand(g, out_ch, 2, 1, 1), rand(g, 2, 2, 3, 3), rand(g, 2, in_ch, 1, 1)
    x = torch.randn(1, in_ch, 6, 6, generator=g, dtype=torch.float64)
    # reference: the factored path itself, 1x1 conv -> 3x3 conv -> 1x1 conv, against the merged kernel's conv
    path = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.nn.functional.conv2d(
        x, down.double()), mid.double(), padding=1), up.double())
    apply(sd1, {kohya(CONV3) + ".lora_up.weight": up, kohya(CONV3) + ".lora_mid.weight": mid,
                kohya(CONV3) + ".lora_down.weight": down, kohya(CONV3) + ".alpha": torch.tensor(2.0)})
    delta = weight(sd1, "unet", CONV3).double() - w0.double()
    err = max_err(torch.nn.functional.conv2d(x, delta, padding=1), path)
    assert err < 1e-5, f"max abs error {err}"  # observed 7.8e-8

    unpatch(sd1)
    down3 = rand(g, 2, in_ch, 3, 3)  # plain LoCon: a 3x3 down, a 1x1 up
    apply(sd1, {kohya(CONV3) + ".lora_up.weight": up, kohya(CONV3) + ".lora_down.weight": down3})
    expected = w0.double() + torch.einsum("or,rikl->oikl", up.double().flatten(1), down3.double())
    err = max_err(weight(sd1, "unet", CONV3), expected)
    assert err < 1e-6, f"max abs error {err}"


def test_loha_is_the_hadamard_product_of_two_low_rank_products(sd1):
    g = torch.Generator().manual_seed(4)
    w0 = weight(sd1, "unet", ATTN)
    o, i = w0.shape
    w1a, w1b, w2a, w2b = rand(g, o, 3), rand(g, 3, i), rand(g, o, 3), rand(g, 3, i)
    stem = kohya(ATTN)
    apply(sd1, {f"{stem}.hada_w1_a": w1a, f"{stem}.hada_w1_b": w1b, f"{stem}.hada_w2_a": w2a,
                f"{stem}.hada_w2_b": w2b, f"{stem}.alpha": torch.tensor(1.5)}, strength=2.0)
    expected = w0.double() + 2.0 * (1.5 / 3) * ((w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()))
    err = max_err(weight(sd1, "unet", ATTN), expected)
    assert err < 1e-6, f"max abs error {err}"


def test_loha_tucker_on_a_conv(sd1):
    g = torch.Generator().manual_seed(5)
    w0 = weight(sd1, "unet", CONV3)
    o, i = w0.shape[:2]
    t1, t2 = rand(g, 2, 2, 3, 3), rand(g, 2, 2, 3, 3)
    w1a, w1b, w2a, w2b = rand(g, 2, o), rand(g, 2, i), rand(g, 2, o), rand(g, 2, i)
    stem = kohya(CONV3)
    apply(sd1, {f"{stem}.hada_w1_a": w1a, f"{stem}.hada_w1_b": w1b, f"{stem}.hada_w2_a": w2a,
                f"{stem}.hada_w2_b": w2b, f"{stem}.hada_t1": t1, f"{stem}.hada_t2": t2})

    def rebuild(t, wa, wb):  # delta[p, r, k, l] = sum_ij t[i, j, k, l] wa[i, p] wb[j, r], by tensordot
        return torch.tensordot(torch.tensordot(wa.double(), t.double(), dims=([0], [0])), wb.double(),
                               dims=([1], [0])).permute(0, 3, 1, 2)
    expected = w0.double() + rebuild(t1, w1a, w1b) * rebuild(t2, w2a, w2b)
    err = max_err(weight(sd1, "unet", CONV3), expected)
    assert err < 1e-6, f"max abs error {err}"


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product of 2-D matrices, written out."""
    return torch.einsum("ij,kl->ikjl", a, b).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def test_lokr_is_a_kronecker_product_scaled_by_the_rank_of_the_factored_part(sd1):
    g = torch.Generator().manual_seed(6)
    w0 = weight(sd1, "unet", ATTN)  # (32, 32)
    w1, w2a, w2b = rand(g, 4, 2), rand(g, 8, 3), rand(g, 3, 16)
    stem = kohya(ATTN)
    apply(sd1, {f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b,
                f"{stem}.alpha": torch.tensor(6.0)}, strength=0.5)
    expected = w0.double() + 0.5 * (6.0 / 3) * kron(w1.double(), w2a.double() @ w2b.double())
    err = max_err(weight(sd1, "unet", ATTN), expected)
    assert err < 1e-6, f"max abs error {err}"

    unpatch(sd1)  # both factors whole: alpha is ignored (ComfyUI scales only factored LoKr)
    w2 = rand(g, 8, 16)
    apply(sd1, {f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2": w2, f"{stem}.alpha": torch.tensor(6.0)})
    err = max_err(weight(sd1, "unet", ATTN), w0.double() + kron(w1.double(), w2.double()))
    assert err < 1e-6, f"max abs error {err}"


def test_lokr_conv_spreads_the_kernel_over_the_first_factor(sd1):
    g = torch.Generator().manual_seed(7)
    w0 = weight(sd1, "unet", CONV3)  # (32, 32, 3, 3)
    w1, w2 = rand(g, 2, 4), rand(g, 16, 8, 3, 3)
    stem = kohya(CONV3)
    apply(sd1, {f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2": w2})
    expected = torch.einsum("ab,cdkl->acbdkl", w1.double(), w2.double()).reshape(w0.shape)
    err = max_err(weight(sd1, "unet", CONV3), w0.double() + expected)
    assert err < 1e-6, f"max abs error {err}"


def dora_reference(w, delta, dora_scale, strength):
    """DoRA as ComfyUI computes it, in float64: normalise W + delta along the axis dora_scale names (the output
    axis uses the unpatched W's norm), rescale, then blend by strength."""
    w, delta, m = w.double(), delta.double(), dora_scale.double()
    w_calc = w + delta
    if m.shape[0] == w.shape[0]:
        norm = w.norm(dim=1, keepdim=True)
    else:
        norm = w_calc.norm(dim=0, keepdim=True)
    w_calc = w_calc * (m / (norm + torch.finfo(torch.float32).eps))
    return w + strength * (w_calc - w)


@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_dora_scale_decomposes_the_weight(sd1, axis, strength):
    g = torch.Generator().manual_seed(8)
    w0 = weight(sd1, "unet", ATTN)
    up, down = rand(g, w0.shape[0], 4), rand(g, 4, w0.shape[1])
    scale = torch.rand((1, w0.shape[1]) if axis == "input" else (w0.shape[0], 1), generator=g) + 0.5
    stem = kohya(ATTN)
    apply(sd1, {stem + ".lora_up.weight": up, stem + ".lora_down.weight": down, stem + ".alpha": torch.tensor(2.0),
                stem + ".dora_scale": scale}, strength=strength)
    expected = dora_reference(w0, 0.5 * (up.double() @ down.double()), scale, strength)
    err = max_err(weight(sd1, "unet", ATTN), expected)
    assert err < 1e-5, f"max abs error {err}"  # observed 5e-8 .. 8.3e-8


def test_diff_and_diff_b_and_set_weight(sd1):
    g = torch.Generator().manual_seed(9)
    conv = "input_blocks.0.0"
    w0, b0 = weight(sd1, "unet", ATTN), dict(sd1["unet"].named_parameters())[conv + ".bias"].detach().clone()
    diff, diff_b = rand(g, *w0.shape), rand(g, *b0.shape)
    value = rand(g, *weight(sd1, "unet", "out.2").shape)
    apply(sd1, {kohya(ATTN) + ".diff": diff, kohya(conv) + ".diff_b": diff_b, kohya("out.2") + ".set_weight": value},
          strength=0.3)
    params = dict(sd1["unet"].named_parameters())
    assert max_err(params[ATTN + ".weight"], w0.double() + 0.3 * diff.double()) < 1e-6
    assert max_err(params[conv + ".bias"], b0.double() + 0.3 * diff_b.double()) < 1e-6
    assert torch.equal(params["out.2.weight"], value)  # set_weight ignores the strength, as in ComfyUI


def test_stacked_loras_on_one_weight_add_in_float32_and_round_once(sd1):
    g = torch.Generator().manual_seed(10)
    w0 = weight(sd1, "text0", FC1)
    name = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    files = [{name + ".lora_up.weight": rand(g, w0.shape[0], 2), name + ".lora_down.weight": rand(g, 2, w0.shape[1])}
             for _ in range(2)]
    sets = [match_lora(sd, sd1, "sd1", f"l{i}").patch_set("text0", s)
            for i, (sd, s) in enumerate(zip(files, (1.0, -0.5)))]
    with patched(sd1, sets):
        got = weight(sd1, "text0", FC1)
    w32 = w0.clone()
    for sd, s in zip(files, (1.0, -0.5)):
        w32 += (s * 1.0) * (sd[name + ".lora_up.weight"] @ sd[name + ".lora_down.weight"])
    assert torch.equal(got, w32.half().float())  # ComfyUI's order of operations, bit for bit


# -- key formats ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [UNetConfig.sd15(), UNetConfig.sd21(), UNetConfig.sdxl_base(),
                                    UNetConfig.sdxl_refiner(), FAMILIES["sdxl"][0]],
                         ids=["sd15", "sd21", "sdxl", "sdxl_refiner", "tiny_sdxl"])
def test_diffusers_module_paths_agree_with_diffusers_own_checkpoint_converter(config):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    with torch.device("meta"):
        ldm = UNetModel(config).state_dict()
    extra = {"addition_embed_type": "text_time"} if config.adm_in_channels else {}
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()},
                                            {"layers_per_block": config.num_res_blocks[0], **extra})
    ours = diffusers_unet_modules(config)
    wrong = [d for d, tensor in converted.items()
             if ldm.get(ours.get(d.rpartition(".")[0], "?") + "." + d.rpartition(".")[2]) is not tensor]
    assert len(converted) > 200 and not wrong, wrong[:5]


def peft_lora(unet: torch.nn.Module, text_models, seed: int = 11) -> dict[str, torch.Tensor]:
    """A PEFT-format SDXL LoRA (diffusers' names) over every attention and feed-forward Linear and proj_in/out."""
    g = torch.Generator().manual_seed(seed)
    params = dict(unet.named_parameters())
    sd = {}
    for diffusers, ldm in diffusers_unet_modules(unet.config).items():
        if ldm + ".weight" in params and ("attentions" in diffusers) and not diffusers.endswith(("norm", "norm1",
                                                                                                  "norm2", "norm3")):
            out_ch, in_ch = params[ldm + ".weight"].shape[:2]
            sd[f"unet.{diffusers}.lora_A.weight"] = rand(g, 4, in_ch)
            sd[f"unet.{diffusers}.lora_B.weight"] = rand(g, out_ch, 4)
    for prefix, model in zip(("text_encoder", "text_encoder_2"), text_models):
        for key, p in model.named_parameters():
            if ".self_attn." in key or ".mlp." in key:
                if key.endswith(".weight"):
                    sd[f"{prefix}.{key[:-7]}.lora_A.weight"] = rand(g, 4, p.shape[1])
                    sd[f"{prefix}.{key[:-7]}.lora_B.weight"] = rand(g, p.shape[0], 4)
    return sd


def patched_state(nets, sd, family="sdxl", strength=0.8):
    unpatch(nets)
    lora = apply(nets, sd, family, strength)
    state = {t: {k: v.detach().clone() for k, v in m.named_parameters()} for t, m in nets.items()}
    unpatch(nets)
    return lora, state


def test_a_peft_lora_and_diffusers_kohya_conversion_of_it_patch_the_same_weights(sdxl):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    peft = peft_lora(sdxl["unet"], [sdxl["text0"], sdxl["text1"]])
    kohya_sd = convert_state_dict_to_kohya(peft)  # lora_unet_down_blocks_…, lora_te1_…, lora_te2_…, with alpha
    assert any(k.startswith("lora_te2_") for k in kohya_sd)
    assert any(k.startswith("lora_unet_up_blocks") for k in kohya_sd)
    lora, reference = patched_state(sdxl, peft)
    assert not lora.unmatched and len(lora.patches["unet"]) > 20 and len(lora.patches["text1"]) == 12
    for variant in (kohya_sd, convert_state_dict_to_diffusers(peft)):  # the latter: `.lora.down/.lora.up`
        other, state = patched_state(sdxl, variant)
        assert not other.unmatched
        for target in reference:
            for key, value in reference[target].items():
                assert torch.equal(state[target][key], value), (target, key)
    changed = [k for k, v in reference["unet"].items()
               if not torch.equal(v, dict(sdxl["unet"].named_parameters())[k])]
    assert len(changed) == len(lora.patches["unet"])


def test_ldm_diffusers_processor_and_plain_module_names_reach_the_same_weight(sdxl):
    g = torch.Generator().manual_seed(12)
    w = weight(sdxl, "unet", SDXL_ATTN)
    up, down = rand(g, w.shape[0], 2), rand(g, 2, w.shape[1])
    diffusers = next(d for d, l in diffusers_unet_modules(sdxl["unet"].config).items() if l == SDXL_ATTN)
    names = [kohya(SDXL_ATTN) + ".lora_up.weight", "lora_unet_" + diffusers.replace(".", "_") + ".lora_up.weight",
             "unet." + diffusers.replace(".to_k", ".processor.to_k") + "_lora.up.weight",
             "diffusion_model." + SDXL_ATTN + ".lora_up.weight",
             "lycoris_" + diffusers.replace(".", "_") + ".lora_up.weight"]
    results = []
    for up_key in names:
        down_key = up_key.replace("lora_up", "lora_down").replace("_lora.up", "_lora.down")
        _lora, state = patched_state(sdxl, {up_key: up, down_key: down})
        results.append(state["unet"][SDXL_ATTN + ".weight"])
    assert all(torch.equal(r, results[0]) for r in results) and not torch.equal(results[0], w)


def test_every_kohya_layer_of_a_full_size_sdxl_unet_and_text_encoders_is_named(sdxl):
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.sdxl_base())
    names = unet_key_map(unet)
    linear = [k for k, p in unet.named_parameters() if k.endswith(".weight") and p.dim() >= 2]
    assert all(kohya(k[:-7]) in names for k in linear)
    # the kohya names an SDXL trainer writes for the diffusers layout (e.g. sd-scripts' sdxl LoRAs)
    assert names["lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_ff_net_2"] == \
        "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight"
    assert names["lora_unet_up_blocks_0_attentions_2_proj_out"] == "output_blocks.2.1.proj_out.weight"
    assert names["lora_unet_mid_block_attentions_0_transformer_blocks_3_attn2_to_out_0"] == \
        "middle_block.1.transformer_blocks.3.attn2.to_out.0.weight"


def test_refiner_text_keys_use_lora_te_for_its_single_bigg(files):
    from engine.lora import TEXT_ENCODERS, text_key_map
    nets = networks(files, "sdxl")
    names = text_key_map(TEXT_ENCODERS["sdxl_refiner"][0], nets["text1"])
    assert names["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == \
        "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert names["lora_te2_text_projection"] == "text_projection.weight"


# -- errors and logs --------------------------------------------------------------------------------------------------

def test_a_lora_that_matches_nothing_is_an_error_naming_the_file(sd1):
    with pytest.raises(LoraError, match="my_flux_lora.safetensors"):
        match_lora({"transformer.single_blocks.0.linear1.lora_A.weight": torch.zeros(2, 2)}, sd1, "sd1",
                   "my_flux_lora.safetensors")
    wrong_shape = {kohya(ATTN) + ".lora_up.weight": torch.zeros(7, 2),
                   kohya(ATTN) + ".lora_down.weight": torch.zeros(2, 5)}
    with pytest.raises(LoraError, match="other.pt"):
        match_lora(wrong_shape, sd1, "sd1", "other.pt")


def test_partially_matching_keys_are_logged_by_name(sd1, caplog):
    g = torch.Generator().manual_seed(13)
    w0 = weight(sd1, "unet", ATTN)
    sd = {kohya(ATTN) + ".lora_up.weight": rand(g, w0.shape[0], 2),
          kohya(ATTN) + ".lora_down.weight": rand(g, 2, w0.shape[1]),
          "lora_unet_no_such_layer.lora_up.weight": torch.zeros(1), kohya(ATTN) + ".oft_blocks": torch.zeros(1)}
    with caplog.at_level(logging.WARNING, logger="engine.lora"):
        lora = match_lora(sd, sd1, "sd1", "half.safetensors")
    assert set(lora.unmatched) == {"lora_unet_no_such_layer.lora_up.weight", kohya(ATTN) + ".oft_blocks"}
    assert "half.safetensors" in caplog.text and "lora_unet_no_such_layer.lora_up.weight" in caplog.text


def test_reading_safetensors_and_weights_only_pickles(tmp_path):
    sd = {"a.lora_up.weight": torch.ones(2, 1), "a.alpha": torch.tensor(1.0)}
    save_file(sd, str(tmp_path / "x.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "x.ckpt")
    assert read_lora(tmp_path / "x.safetensors").keys() == read_lora(tmp_path / "x.ckpt").keys() == sd.keys()
    (tmp_path / "bad.pt").write_bytes(b"not a pickle")
    with pytest.raises(LoraError, match="bad.pt"):
        read_lora(tmp_path / "bad.pt")


# -- applying and restoring -------------------------------------------------------------------------------------------

def snapshot(nets):
    return {t: {k: v.detach().clone() for k, v in m.named_parameters()} for t, m in nets.items()}


def same(nets, state) -> bool:
    return all(torch.equal(v, state[t][k]) for t, m in nets.items() for k, v in m.named_parameters())


@dataclass(eq=False)
class Counting(WeightPatch):
    """A delta that counts how often it is computed."""
    delta: torch.Tensor
    calls: int = 0

    def update(self, weight, strength):
        self.calls += 1
        weight += strength * self.delta
        return weight


def test_restoring_gives_back_the_original_bits_and_other_sets_alternate_correctly(sdxl):
    original = snapshot(sdxl)
    lora_a = match_lora(peft_lora(sdxl["unet"], [sdxl["text0"], sdxl["text1"]], seed=1), sdxl, "sdxl", "a")
    lora_b = match_lora(peft_lora(sdxl["unet"], [sdxl["text0"], sdxl["text1"]], seed=2), sdxl, "sdxl", "b")
    sets_a = [lora_a.patch_set(t, 1.0) for t in lora_a.patches]
    sets_b = [lora_b.patch_set(t, -0.7) for t in lora_b.patches]
    with patched(sdxl, sets_a):
        state_a = snapshot(sdxl)
    assert not same(sdxl, original) and applied_patches(sdxl["unet"]) == (sets_a[0],)
    with patched(sdxl, sets_b):
        state_b = snapshot(sdxl)
    for sets, state in ((sets_a, state_a), (sets_b, state_b), ([], original), (sets_a, state_a)):
        with patched(sdxl, sets):
            assert same(sdxl, state)
    unpatch(sdxl)
    assert same(sdxl, original)


def test_the_same_sets_are_not_applied_twice_and_a_changed_strength_is(sd1):
    w0 = weight(sd1, "unet", ATTN)
    patch = Counting(torch.full_like(w0, 0.25))
    for _ in range(3):
        with patched(sd1, [PatchSet("unet", ((ATTN + ".weight", patch, 1.0),))]):
            pass
    assert patch.calls == 1
    with patched(sd1, [PatchSet("unet", ((ATTN + ".weight", patch, 2.0),))]):
        assert torch.equal(weight(sd1, "unet", ATTN), w0 + 2.0 * 0.25)
    assert patch.calls == 2
    with patched(sd1, []):
        assert torch.equal(weight(sd1, "unet", ATTN), w0)


def test_strength_zero_leaves_the_weights_unchanged(sd1):
    original = snapshot(sd1)
    g = torch.Generator().manual_seed(14)
    w0 = weight(sd1, "unet", ATTN)
    apply(sd1, {kohya(ATTN) + ".lora_up.weight": rand(g, w0.shape[0], 2),
                kohya(ATTN) + ".lora_down.weight": rand(g, 2, w0.shape[1])}, strength=0.0)
    assert same(sd1, original)


def test_different_sets_while_a_block_is_open_is_a_conflict(sd1):
    patch = Counting(torch.ones(()))
    with patched(sd1, [PatchSet("unet", ((ATTN + ".weight", patch, 1.0),))]):
        with patched(sd1, [PatchSet("unet", ((ATTN + ".weight", patch, 1.0),))]):
            pass  # the same sets nest fine
        with pytest.raises(PatchConflict):
            with patched(sd1, []):
                pass
        with pytest.raises(PatchConflict):
            unpatch(sd1)
    unpatch(sd1)


def test_a_failing_patch_leaves_the_network_unpatched(sd1):
    original = snapshot(sd1)
    good = Counting(torch.ones(()))
    bad = LoRAPatch(torch.zeros(3, 1), torch.zeros(1, 3))  # does not fit the weight
    with pytest.raises(RuntimeError):
        with patched(sd1, [PatchSet("unet", ((ATTN + ".weight", good, 1.0), (CONV3 + ".weight", bad, 1.0)))]):
            pass
    assert same(sd1, original) and applied_patches(sd1["unet"]) == ()


# -- nodes ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FakeHandle:
    """A MODEL/CLIP handle with the interface the loaders use (`active`, `with_patches`, `patches`, `family`)."""
    modules: dict
    family: str
    patches: tuple = ()
    is_clip: bool = False

    @contextmanager
    def active(self):
        with patched(self.modules, self.patches):
            yield build_encoder(self.family, list(self.modules.values())) if self.is_clip else self.modules["unet"]

    def with_patches(self, *patch_sets):
        return replace(self, patches=self.patches + patch_sets)


class FakeModels:
    def __init__(self, folder: Path):
        self.folder = folder

    def list(self, folder):
        return sorted(p.name for p in self.folder.iterdir())

    def check(self, folder, name):
        self.find(folder, name)

    def find(self, folder, name, progress=None):
        if not (self.folder / name).is_file():
            raise NotFound(f"no {folder} file named {name!r}: looked in {self.folder}")
        return self.folder / name


@pytest.fixture
def node_context(tmp_path, sd1):
    g = torch.Generator().manual_seed(15)
    w0, t0 = weight(sd1, "unet", ATTN), weight(sd1, "text0", FC1)
    save_file({kohya(ATTN) + ".lora_up.weight": rand(g, w0.shape[0], 2),
               kohya(ATTN) + ".lora_down.weight": rand(g, 2, w0.shape[1]),
               "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight": rand(g, t0.shape[0], 2),
               "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight": rand(g, 2, t0.shape[1])},
              str(tmp_path / "style.safetensors"))
    return NodeContext(folders=Folders(tmp_path, tmp_path, tmp_path), models=FakeModels(tmp_path))


def test_lora_loader_node_adds_one_patch_set_per_network_and_strength_zero_is_identity(sd1, node_context):
    model = FakeHandle({"unet": sd1["unet"]}, "sd1")
    clip = FakeHandle({"text0": sd1["text0"]}, "sd1", is_clip=True)
    new_model, new_clip = LoraLoader().load_lora(model, clip, "style.safetensors", 0.5, 1.5, node_context)
    assert [s.target for s in new_model.patches] == ["unet"] and new_model.patches[0].entries[0][2] == 0.5
    assert [s.target for s in new_clip.patches] == ["text0"] and new_clip.patches[0].round_to == torch.float16
    assert LoraLoader().load_lora(model, clip, "style.safetensors", 0.0, 0.0, node_context) == (model, clip)
    only_clip = LoraLoader().load_lora(model, clip, "style.safetensors", 0.0, 1.0, node_context)
    assert only_clip[0] is model and only_clip[1].patches
    (patched_model,) = LoraLoaderModelOnly().load_lora_model_only(model, "style.safetensors", -2.0, node_context)
    assert patched_model.patches[0].entries[0][2] == -2.0
    w0 = weight(sd1, "unet", ATTN)
    with new_model.active() as unet:
        assert not torch.equal(dict(unet.named_parameters())[ATTN + ".weight"], w0)
    with model.active() as unet:
        assert torch.equal(dict(unet.named_parameters())[ATTN + ".weight"], w0)
    assert LoraLoader.VALIDATE_INPUTS(node_context, "style.safetensors") is True
    assert "missing.safetensors" in LoraLoader.VALIDATE_INPUTS(node_context, "missing.safetensors")


def test_a_model_handle_with_a_config_is_matched_without_loading_or_patching_its_unet(sd1, node_context):
    class Unloadable(FakeHandle):
        config = sd1["unet"].config

        def active(self):
            raise AssertionError("the UNet was made active just to read its layer names")

    model = Unloadable({"unet": sd1["unet"]}, "sd1")
    (patched_model,) = LoraLoaderModelOnly().load_lora_model_only(model, "style.safetensors", 1.0, node_context)
    reference = LoraLoaderModelOnly().load_lora_model_only(FakeHandle({"unet": sd1["unet"]}, "sd1"),
                                                           "style.safetensors", 1.0, node_context)[0]
    assert [n for n, _p, _s in patched_model.patches[0].entries] == [n for n, _p, _s in reference.patches[0].entries]


def test_node_schemas_follow_comfyui():
    registry = default_registry()
    info = registry.object_info("LoraLoader")
    assert info["input_order"]["required"] == ["model", "clip", "lora_name", "strength_model", "strength_clip"]
    options = info["input"]["required"]["strength_clip"][1]
    assert {k: options[k] for k in ("default", "min", "max", "step")} == \
        {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
    assert info["output"] == ["MODEL", "CLIP"] and info["category"] == "loaders"
    assert info["display_name"] == "Load LoRA (Model and CLIP)"
    only = registry.object_info("LoraLoaderModelOnly")
    assert only["input_order"]["required"] == ["model", "lora_name", "strength_model"]
    assert only["output"] == ["MODEL"] and only["display_name"] == "Load LoRA"


# -- end to end through POST /api/v1/prompts --------------------------------------------------------------------------

PNG = {"Accept": "image/png"}


def sd1_lora(seed: int, unet_sd: dict, text_sd: dict) -> dict[str, torch.Tensor]:
    """A kohya LoRA over one UNet attention projection and one text MLP layer, alpha = rank."""
    g = torch.Generator().manual_seed(seed)
    w, t = unet_sd[ATTN + ".weight"], text_sd[FC1 + ".weight"]
    te = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    return {kohya(ATTN) + ".lora_up.weight": rand(g, w.shape[0], 4, scale=1.0),
            kohya(ATTN) + ".lora_down.weight": rand(g, 4, w.shape[1], scale=1.0),
            kohya(ATTN) + ".alpha": torch.tensor(4.0),
            te + ".lora_up.weight": rand(g, t.shape[0], 4, scale=1.0),
            te + ".lora_down.weight": rand(g, 4, t.shape[1], scale=1.0)}


@pytest.fixture
def e2e_settings(tmp_path) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", max_queue=8)
    models = settings.models_dir
    write_checkpoint(models / "checkpoints", "sd1")
    sd = checkpoint_state_dict("sd1")
    unet_sd = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    text_sd = {k[len("cond_stage_model.transformer."):]: v for k, v in sd.items()
               if k.startswith("cond_stage_model.transformer.")}
    (models / "loras").mkdir(parents=True)
    for seed, name in ((1, "a"), (2, "b")):
        save_file(sd1_lora(seed, unet_sd, text_sd), str(models / "loras" / f"{name}.safetensors"))
    # the same checkpoint with LoRA "a" merged in, computed as ComfyUI patches (float32, scale alpha/rank = 1)
    lora = sd1_lora(1, unet_sd, text_sd)
    te = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    merged = dict(sd)
    merged["model.diffusion_model." + ATTN + ".weight"] = unet_sd[ATTN + ".weight"] + (1.0 * (4.0 / 4)) * (
        lora[kohya(ATTN) + ".lora_up.weight"] @ lora[kohya(ATTN) + ".lora_down.weight"])
    merged["cond_stage_model.transformer." + FC1 + ".weight"] = text_sd[FC1 + ".weight"].half().float() + 1.0 * (
        lora[te + ".lora_up.weight"] @ lora[te + ".lora_down.weight"])
    save_file({k: v.contiguous() for k, v in merged.items()}, str(models / "checkpoints" / "merged_a.safetensors"))
    save_file({"transformer.blocks.0.attn.lora_A.weight": torch.zeros(2, 2)},
              str(models / "loras" / "flux.safetensors"))
    return settings


def lora_prompt(lora: str | None, strength: float = 1.0, ckpt: str = "tiny_sd1.safetensors", seed: int = 3) -> dict:
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["10", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["10", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 3, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "lora"}},
        "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": lora,
                                                      "strength_model": strength, "strength_clip": strength}},
    }
    if lora is None:  # the same graph without the loader
        del prompt["10"]
        for node, slot in (("6", "clip"), ("7", "clip"), ("3", "model")):
            prompt[node]["inputs"][slot] = ["4", 1 if slot == "clip" else 0]
    return prompt


def pixels(client, prompt) -> np.ndarray:
    response = client.post("/api/v1/prompts", json=prompt, headers=PNG)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_end_to_end_lora_equals_the_merged_checkpoint_in_any_order(make_client, e2e_settings):
    client = make_client(e2e_settings)
    with_a = pixels(client, lora_prompt("a.safetensors"))
    merged = pixels(client, lora_prompt(None, ckpt="merged_a.safetensors"))
    plain = pixels(client, lora_prompt(None))
    with_b = pixels(client, lora_prompt("b.safetensors", seed=3))
    again_a = pixels(client, lora_prompt("a.safetensors", strength=1.0, seed=3))
    zero = pixels(client, lora_prompt("a.safetensors", strength=0.0))
    assert np.array_equal(with_a, merged)  # patched in place == the weights merged into the file
    assert not np.array_equal(with_a, plain) and not np.array_equal(with_b, with_a)
    assert np.array_equal(again_a, with_a)  # after b was applied and restored
    assert np.array_equal(zero, plain)
    fresh = make_client(Settings(data_dir=e2e_settings.data_dir, cache_size=0))
    assert np.array_equal(pixels(fresh, lora_prompt("b.safetensors")), with_b)


def test_end_to_end_errors_name_the_file(make_client, e2e_settings):
    client = make_client(e2e_settings)
    response = client.post("/api/v1/prompts", json=lora_prompt("flux.safetensors"))
    assert response.status_code == 400 and "flux.safetensors" in response.text
    response = client.post("/api/v1/prompts", json=lora_prompt("missing.safetensors"))
    assert response.status_code == 400 and "missing.safetensors" in response.text
