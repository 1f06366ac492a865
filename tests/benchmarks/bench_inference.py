"""Benchmark: full-size SD1.5 and SDXL architectures with random weights (generated here, never committed).

Per family: checkpoint load time against the time to read the file, peak RSS against the weights' size, seconds
per sampler step (CFG, cond and uncond in one batch), the sampler's own overhead as a share of the step, and VAE
decode time. Prints one JSON object. On a CUDA machine pass `--device cuda` (fp16, the sizes and step counts
below are then worth raising: `--size 1024 --steps 20` for SDXL).

Each measurement runs in a fresh subprocess so that peak RSS belongs to one load.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def generate(family: str, path: Path, dtype: torch.dtype) -> int:
    """A random checkpoint with the real full-size key layout; returns its size in bytes."""
    from safetensors.torch import save_file

    from engine.models.clip import CLIPTextConfig, CLIPTextModel
    from engine.models.unet import UNetConfig, UNetModel
    from engine.models.vae import AutoencoderKL, VAEConfig
    from tests.tiny_models import to_openclip

    generator = torch.Generator().manual_seed(0)

    def random_like(module: torch.nn.Module, prefix: str, openclip: bool = False) -> dict[str, torch.Tensor]:
        with torch.device("meta"):
            shapes = {k: (v.shape, v.dtype) for k, v in module.state_dict().items()}
        weights = {}
        for key, (shape, kind) in shapes.items():
            if not kind.is_floating_point:
                weights[key] = torch.arange(shape[-1]).expand(shape).clone()
            else:
                weights[key] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        weights = to_openclip(weights) if openclip else weights
        return {prefix + k: v for k, v in weights.items()}

    with torch.device("meta"):
        if family == "sd15":
            parts = [(UNetModel(UNetConfig.sd15()), "model.diffusion_model.", False),
                     (CLIPTextModel(CLIPTextConfig.clip_l()), "cond_stage_model.transformer.", False)]
        else:
            parts = [(UNetModel(UNetConfig.sdxl_base()), "model.diffusion_model.", False),
                     (CLIPTextModel(CLIPTextConfig.clip_l()), "conditioner.embedders.0.transformer.", False),
                     (CLIPTextModel(CLIPTextConfig.vit_bigg()), "conditioner.embedders.1.model.", True)]
        parts.append((AutoencoderKL(VAEConfig.sd()), "first_stage_model.", False))
    sd = {}
    for module, prefix, openclip in parts:
        sd.update(random_like(module, prefix, openclip))
    save_file(sd, str(path))
    return path.stat().st_size


def read_seconds(path: Path) -> float:
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass
    return time.perf_counter() - started


def measure(family: str, path: Path, device: str, size: int, steps: int) -> dict:
    """Runs in the child process: load, sample, decode."""
    from engine.checkpoints import load_checkpoint
    from engine.devices import policy_for, resolve_device
    from engine.diffusion import DiffusionModel
    from engine import autoencode
    from engine.sampling import ksampler
    from engine.text.handle import ClipHandle

    policy = policy_for(resolve_device(device))
    baseline = reset_peak_rss()
    started = time.perf_counter()
    loaded = load_checkpoint(path, policy)
    load_s = time.perf_counter() - started
    weights = sum(p.numel() * p.element_size() for m in [loaded.unet, loaded.vae, *loaded.text_models]
                  for p in m.parameters())
    peak_after_load = status_bytes("VmHWM")

    model = DiffusionModel(loaded.unet, loaded.model_sampling, loaded.family.latent_format, loaded.family.name)
    clip = ClipHandle.for_family(loaded.family.name, loaded.text_models, None)
    cond, pooled = clip.encode("a photo of a cat")
    uncond, upooled = clip.encode("")
    latent = torch.zeros(1, 4, size // 8, size // 8, device=policy.device)
    positive = model.conds([[cond, {"pooled_output": pooled}]], latent, "positive")
    negative = model.conds([[uncond, {"pooled_output": upooled}]], latent, "negative")

    model_seconds = []

    def timed_model(*args):
        sync(policy.device)
        t = time.perf_counter()
        out = model(*args)
        sync(policy.device)
        model_seconds.append(time.perf_counter() - t)
        return out

    step_times = []
    last = [time.perf_counter()]

    def callback(_step):
        sync(policy.device)
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    last[0] = time.perf_counter()
    samples = ksampler.sample(timed_model, model.sampling, model.latent_format, positive, negative, latent, seed=0,
                              steps=steps, cfg=7.0, sampler_name="euler", scheduler="normal", callback=callback)
    # the first step pays one-off costs (page faults of memory-mapped weights, kernel selection): report apart
    steady = step_times[1:] or step_times
    step_s = sum(steady) / len(steady)
    model_s = sum(model_seconds[1:] or model_seconds) / len(model_seconds[1:] or model_seconds)
    sync(policy.device)
    t = time.perf_counter()
    image = autoencode.decode(loaded.vae, samples)
    sync(policy.device)
    decode_s = time.perf_counter() - t
    return {
        "load_s": round(load_s, 3),
        "weights_bytes": weights,
        "peak_rss_bytes_over_baseline": peak_after_load - baseline,
        "peak_rss_over_weights": round((peak_after_load - baseline) / weights, 3),
        "first_step_s": round(step_times[0], 3),
        "step_s": round(step_s, 3),
        "sampler_overhead_pct": round(100 * max(0.0, step_s - model_s) / step_s, 3),
        "vae_decode_s": round(decode_s, 3),
        "image_shape": list(image.shape),
        "peak_rss_bytes_total": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Start the peak-RSS watermark afresh (Linux: writing 5 to clear_refs) and return the RSS now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=3, help="sampler steps (the first is reported apart)")
    parser.add_argument("--file-dtype", default="fp16", choices=["fp16", "fp32"],
                        help="dtype the generated checkpoint is saved in (release files are mostly fp16)")
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints are written (default: temp)")
    parser.add_argument("--child", nargs=2, metavar=("FAMILY", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]), args.device, args.size, args.steps)))
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-inference-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for family in args.families.split(","):
        path = workdir / f"random_{family}_{args.file_dtype}.safetensors"
        if not path.exists():
            started = time.perf_counter()
            generate(family, path, torch.float16 if args.file_dtype == "fp16" else torch.float32)
            print(f"generated {path.name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        read_s = read_seconds(path)
        child = subprocess.run([sys.executable, __file__, "--device", args.device, "--size", str(args.size),
                                "--steps", str(args.steps), "--child", family, str(path)],
                               capture_output=True, text=True, cwd=REPO)
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 1
        result = json.loads(child.stdout.strip().splitlines()[-1])
        results.append({"family": family, "device": args.device, "size": args.size, "steps": args.steps,
                        "file_bytes": path.stat().st_size, "file_dtype": args.file_dtype,
                        "read_file_s": round(read_s, 3), "load_over_read": round(result["load_s"] / read_s, 3),
                        **result})
        print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({"benchmark": "inference", "cpu_count": os.cpu_count(), "torch": torch.__version__,
                      "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
