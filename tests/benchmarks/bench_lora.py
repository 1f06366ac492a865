"""Benchmark: applying and removing a LoRA on a full-size SDXL (random weights), and the sampler step time with the
LoRA applied against without it. Prints one JSON object.

The SDXL UNet and both text encoders (CLIP-L, OpenCLIP bigG) are built from random tensors, in bfloat16 on the CPU
by default (the whole SDXL in float32 is 14 GB before any backup; bf16 matmuls run on AMX where the CPU has it), in
float16 with `--device cuda`. The LoRA is a random rank-32 kohya file with diffusers-style module names (as
sd-scripts writes SDXL LoRAs), alpha 16, over every attention projection, feed-forward layer and proj_in/proj_out
of the UNet and the six linear layers of every text-encoder layer, saved in float16 and read back from disk.

Measured: reading and matching the file; applying it (in place, float32 arithmetic, backups of the patched
weights) and restoring the originals, UNet and text encoders apart, best of `--rounds`; entering again with the
same patches; and seconds per sampler step (euler, CFG 7 with cond and uncond in one batch of 2, at `--size`
pixels, 256 by default on the CPU) through the real handle, alternating `--step-rounds` runs without and with the
LoRA (fastest step of each reported, the median beside it). The step time with the LoRA should equal the step time
without: the weights are patched in place before the loop, not wrapped (`patched_in_place` checks that the sampler
calls the same module over the same tensor storage, with no hooks).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from engine.diffusion import DiffusionModel  # noqa: E402
from engine.lora import diffusers_unet_modules, match_lora, read_lora  # noqa: E402
from engine.models.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from engine.models.unet import UNetConfig, UNetModel  # noqa: E402
from engine.patching import patched, unpatch  # noqa: E402
from engine.sampling import ksampler  # noqa: E402
from engine.sampling.model_sampling import SDXL_LATENT, ModelSampling  # noqa: E402

RANK = 32
ALPHA = 16.0
UNET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LAYERS = {"self_attn.q_proj": "self_attn_q_proj", "self_attn.k_proj": "self_attn_k_proj",
               "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj",
               "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2"}


def random_networks(device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Full-size SDXL UNet and text encoders with random weights (normal, std 0.02; norm scales 1)."""
    nets = {"unet": UNetModel(UNetConfig.sdxl_base(), device=device, dtype=dtype),
            "text0": CLIPTextModel(CLIPTextConfig.clip_l(), device=device, dtype=dtype),
            "text1": CLIPTextModel(CLIPTextConfig.vit_bigg(), device=device, dtype=dtype)}
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for net in nets.values():
            for name, p in net.named_parameters():
                if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=generator)
            net.eval().requires_grad_(False)
    return nets


def random_lora(nets: dict[str, torch.nn.Module], path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    unet_params = dict(nets["unet"].named_parameters())
    sd: dict[str, torch.Tensor] = {}

    def add(stem: str, shape: torch.Size) -> None:
        out_ch, in_ch = shape[0], shape[1]
        kernel = (1, 1) if len(shape) == 4 else ()  # SDXL's proj_in/proj_out are Linear; kept general
        sd[stem + ".lora_down.weight"] = (torch.randn((RANK, in_ch, *kernel), generator=g) * 0.01).half()
        sd[stem + ".lora_up.weight"] = (torch.randn((out_ch, RANK, *kernel), generator=g) * 0.01).half()
        sd[stem + ".alpha"] = torch.tensor(ALPHA)

    for diffusers, ldm in diffusers_unet_modules(nets["unet"].config).items():
        if ldm + ".weight" in unet_params and diffusers.endswith(UNET_LAYERS):
            add("lora_unet_" + diffusers.replace(".", "_"), unet_params[ldm + ".weight"].shape)
    for target, prefix in (("text0", "lora_te1_"), ("text1", "lora_te2_")):
        params = dict(nets[target].named_parameters())
        for layer in range(nets[target].config.layers):
            for path_, flat in TEXT_LAYERS.items():
                add(f"{prefix}text_model_encoder_layers_{layer}_{flat}",
                    params[f"text_model.encoder.layers.{layer}.{path_}.weight"].shape)
    save_file(sd, str(path))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def step_times(model: DiffusionModel, device: torch.device, size: int, steps: int) -> tuple[float, list[float]]:
    """(seconds to enter the handle's `active()`, seconds of each sampler step)."""
    g = torch.Generator().manual_seed(2)
    latent = torch.zeros(1, 4, size // 8, size // 8, device=device)
    conds = [model.conds([[torch.randn(1, 77, 2048, generator=g),
                           {"pooled_output": torch.randn(1, 1280, generator=g)}]], latent, kind)
             for kind in ("positive", "negative")]
    times: list[float] = []
    last = [0.0]

    def callback(_step) -> None:
        sync(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    sync(device)
    started = time.perf_counter()
    with torch.inference_mode(), model.active():
        sync(device)
        enter_s = time.perf_counter() - started
        last[0] = time.perf_counter()
        ksampler.sample(model, model.sampling, model.latent_format, conds[0], conds[1], latent, seed=0, steps=steps,
                        cfg=7.0, sampler_name="euler", scheduler="normal", callback=callback)
    return enter_s, times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="weights' dtype (default: bf16 on the CPU, fp16 on CUDA)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side for the step time (default 256 on the CPU, 1024 on CUDA)")
    parser.add_argument("--steps", type=int, default=5, help="sampler steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="apply/restore repetitions")
    parser.add_argument("--step-rounds", type=int, default=3, help="sampler runs without and with the LoRA, each")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "bf16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    size = args.size or (1024 if device.type == "cuda" else 256)
    result: dict = {"device": str(device), "dtype": dtype_name, "torch_threads": torch.get_num_threads(),
                    "image_size": size, "lora_rank": RANK}

    started = time.perf_counter()
    nets = random_networks(device, dtype)
    result["build_weights_s"] = round(time.perf_counter() - started, 1)
    result["weights_bytes"] = {t: sum(p.numel() * p.element_size() for p in n.parameters()) for t, n in nets.items()}

    with tempfile.TemporaryDirectory(prefix="bench-lora-") as workdir:
        path = Path(workdir) / "random_sdxl_rank32.safetensors"
        random_lora(nets, path)
        result["lora_file_bytes"] = path.stat().st_size
        started = time.perf_counter()
        sd = read_lora(path)
        result["read_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    lora = match_lora(sd, nets, "sdxl", path.name)
    result["match_s"] = round(time.perf_counter() - started, 3)
    result["patched_weights"] = {t: len(p) for t, p in lora.patches.items()}
    unet_sets = [lora.patch_set("unet", 0.8)]
    text_sets = [lora.patch_set("text0", 0.8), lora.patch_set("text1", 0.8)]
    text_nets = {t: nets[t] for t in ("text0", "text1")}

    def enter(modules, sets):
        with patched(modules, sets):
            pass

    apply_unet, restore_unet, apply_text, restore_text = [], [], [], []
    for _ in range(args.rounds):
        apply_unet.append(timed(device, lambda: enter({"unet": nets["unet"]}, unet_sets)))
        again = timed(device, lambda: enter({"unet": nets["unet"]}, unet_sets))
        restore_unet.append(timed(device, lambda: unpatch([nets["unet"]])))
        apply_text.append(timed(device, lambda: enter(text_nets, text_sets)))
        restore_text.append(timed(device, lambda: unpatch(text_nets)))
    patched_params = {n for s in unet_sets for n, _p, _s in s.entries}
    result.update({
        "apply_unet_s": round(min(apply_unet), 3), "restore_unet_s": round(min(restore_unet), 3),
        "apply_text_s": round(min(apply_text), 3), "restore_text_s": round(min(restore_text), 3),
        "reenter_same_patches_s": round(again, 6),
        "unet_backup_bytes": sum(p.numel() * p.element_size() for n, p in nets["unet"].named_parameters()
                                 if n in patched_params),
    })

    plain = DiffusionModel(nets["unet"], ModelSampling("eps").to(device), SDXL_LATENT, "sdxl")
    with_lora = plain.with_patches(*unet_sets)
    storage = [p.data_ptr() for p in nets["unet"].parameters()]
    with with_lora.active() as unet:  # the network the sampler calls: the same module, the same tensors
        result["patched_in_place"] = unet is nets["unet"] and storage == [p.data_ptr() for p in unet.parameters()] \
            and not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    runs: dict[str, list[float]] = {"without": [], "with": []}
    enters: dict[str, list[float]] = {"without": [], "with": []}
    for round_ in range(args.step_rounds):
        for label, model in (("without", plain), ("with", with_lora)):
            enter_s, times = step_times(model, device, size, args.steps)
            enters[label].append(enter_s)
            if round_ == 0 and label == "without":
                result["warmup_step_s"] = round(times[0], 3)
            # only the very first step pays one-off costs (page faults, kernel selection); later runs are warm
            runs[label] += times[1:] if round_ == 0 and label == "without" else times
    # the minimum is the estimate least disturbed by other work on the machine; the median is shown beside it
    without, with_ = min(runs["without"]), min(runs["with"])
    result.update({
        "step_s_without_lora": round(without, 3), "step_s_with_lora": round(with_, 3),
        "step_ratio_with_over_without": round(with_ / without, 3),
        "step_s_median": {k: round(statistics.median(v), 3) for k, v in runs.items()},
        "active_enter_s": {k: [round(x, 3) for x in v] for k, v in enters.items()},  # includes the patch swaps
    })
    unpatch([nets["unet"]])
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
