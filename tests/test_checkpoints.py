"""Checkpoint files: family detection, formats, dtypes, and clear errors for files that are not checkpoints."""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoints import CheckpointError, V_PREDICTION_PROBE, detect_family, load_checkpoint
from engine.devices import policy_for
from engine.weightfile import WeightFile
from tests.tiny_models import FAMILIES, checkpoint_state_dict, write_checkpoint

CPU = policy_for(torch.device("cpu"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_and_unet_config_are_detected(family):
    detected, config = detect_family(checkpoint_state_dict(family))
    assert detected.name == family
    assert config == FAMILIES[family][0]
    assert detected.latent_format.scale_factor == (0.13025 if family.startswith("sdxl") else 0.18215)


def test_sd2_v_prediction_is_read_from_the_last_attention_norm():
    sd = checkpoint_state_dict("sd2")
    sd[V_PREDICTION_PROBE] = torch.randn(64) * 0.5  # v-prediction checkpoints have a wide spread here
    assert detect_family(sd)[0].prediction == "v"
    sd[V_PREDICTION_PROBE] = torch.randn(64) * 0.01
    assert detect_family(sd)[0].prediction == "eps"


def test_ckpt_and_safetensors_load_the_same_weights(tmp_path):
    sd = checkpoint_state_dict("sd1")
    torch.save({"state_dict": sd, "global_step": 1}, tmp_path / "model.ckpt")
    from_ckpt = load_checkpoint(tmp_path / "model.ckpt", CPU)
    from_safetensors = load_checkpoint(write_checkpoint(tmp_path, "sd1"), CPU)
    for a, b in zip(from_ckpt.unet.state_dict().values(), from_safetensors.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_half_precision_file_runs_in_float32_on_the_cpu(tmp_path):
    sd = {k: v.half() for k, v in checkpoint_state_dict("sd1").items()}
    save_file(sd, str(tmp_path / "half.safetensors"))
    loaded = load_checkpoint(tmp_path / "half.safetensors", CPU)
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float32}
    assert {p.dtype for p in loaded.vae.parameters()} == {torch.float32}


def test_float32_file_is_used_in_place_on_the_cpu(tmp_path):
    """No copy: the UNet's float32 weights are views of the memory-mapped file."""
    loaded = load_checkpoint(write_checkpoint(tmp_path, "sd1"), CPU)
    weight = loaded.unet.input_blocks[0][0].weight
    assert not weight.untyped_storage().resizable()  # storage borrowed from the mapping, not allocated by torch


def test_weight_file_matches_safetensors_reader(tmp_path):
    from safetensors.torch import load_file

    path = write_checkpoint(tmp_path, "sdxl")
    mapped = WeightFile(path)
    for key, value in load_file(str(path)).items():
        assert torch.equal(mapped[key], value), key


@pytest.mark.parametrize("content, fragment", [
    (b"", "too short"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", "could not be read"),
])
def test_unreadable_files_are_checkpoint_errors(tmp_path, content, fragment):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        load_checkpoint(path, CPU)


def test_truncated_file_is_refused(tmp_path):
    path = write_checkpoint(tmp_path, "sd1")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path, CPU)


def test_missing_vae_is_named(tmp_path):
    sd = {k: v for k, v in checkpoint_state_dict("sd1").items() if not k.startswith("first_stage_model.")}
    save_file(sd, str(tmp_path / "novae.safetensors"))
    with pytest.raises(CheckpointError, match="novae.safetensors"):
        load_checkpoint(tmp_path / "novae.safetensors", CPU)


def test_unknown_text_encoder_is_named(tmp_path):
    sd = {k: v for k, v in checkpoint_state_dict("sd1").items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(CheckpointError, match="no text encoder"):
        detect_family(sd, "odd.safetensors")
