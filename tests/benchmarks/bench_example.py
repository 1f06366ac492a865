"""Benchmark: the API contract's example prompt (openapi.yaml `components.schemas.Prompt.example`, a pixel-art
pipeline: SDXL + LoRA -> VAEDecode -> ImageScaleBy 0.125 -> ImageEstimateForegroundMask (u2net) -> BinarizeMask ->
ImageCutout -> ImageScaleBy 8 -> SaveImage) at full size with random weights, timed node by node.

Two parts, one JSON object:
- `postprocess`: the post-processing chain alone on a `--post-size` image (1024 by default, SDXL's native size)
  with full-size random U^2-Net weights, each node timed over `--repeats` runs (median), plus every ImageScaleBy
  method at that size and U^2-Net's load and forward times.
- `example`: the example prompt verbatim through the executor (validation, loaders, cache), except the sampler's
  step count, which `--steps` lowers on the CPU (the prompt asks for 25; the JSON says which ran). The models are
  random full-size files in the example's names: `checkpoints/sd_xl_base_1.0.safetensors` (bench_inference.py's
  layout, written tensor by tensor; `--checkpoint-dtype fp32` makes a 14 GB file the CPU loader maps in place
  instead of converting 7 GB of fp16 into 13 GB of memory), `loras/pixel-art-xl-v1.1.safetensors` (a kohya-layout
  LoRA on every attention projection of the UNet, rank `--lora-rank`) and `background_removal/u2net.pth`. The
  prompt runs `--runs` times, the seed changed after the first run so that every node after the loaders runs
  again: the first run pays loading and page faults, the others show steady times. Node times come from the
  executor's `executing` events. A part whose nodes or model plumbing are not there yet is reported as skipped,
  with the reason.

On a GPU machine: `--device cuda --steps 25`. Files are generated once into `--workdir` (default: a temporary
folder) and reused when present.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from engine.models.u2net import U2Net, U2NetConfig  # noqa: E402

GROUPS = {"KSampler": "sampling", "VAEDecode": "vae_decode", "ImageEstimateForegroundMask": "u2net",
          "ImageScaleBy": "resizes", "CheckpointLoaderSimple": "loading", "LoraLoader": "loading",
          "CLIPTextEncode": "text_encoding"}


def example_prompt() -> dict[str, Any]:
    with open(REPO.parent / "shared" / "openapi.yaml") as f:
        spec = yaml.safe_load(f)
    return spec["components"]["schemas"]["Prompt"]["example"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# Random model files in the example's names


def random_u2net_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-size u2net weights of the published layout, He-scaled so activations stay finite."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in U2Net(U2NetConfig.u2net()).state_dict().items()}
    weights = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.tensor(0)
        elif key.endswith(("running_var", "bn_s1.weight")):
            weights[key] = torch.ones(shape)
        elif key.endswith("weight"):
            weights[key] = torch.randn(shape, generator=generator) * 0.7 * (2.0 / shape[1:].numel()) ** 0.5
        else:
            weights[key] = torch.zeros(shape)
    return weights


def random_lora(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya-layout SDXL LoRA (`lora_unet_<ldm module path>.lora_down/lora_up/alpha`) on every attention
    projection of the UNet, fp16 like released files."""
    from engine.models.unet import UNetConfig, UNetModel

    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.sdxl_base())
    weights = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and (".attn1." in name or ".attn2." in name):
            key = "lora_unet_" + name.replace(".", "_")
            weights[f"{key}.lora_down.weight"] = (torch.randn(rank, module.in_features, generator=generator)
                                                  * 0.01).half()
            weights[f"{key}.lora_up.weight"] = (torch.randn(module.out_features, rank, generator=generator)
                                                * 0.01).half()
            weights[f"{key}.alpha"] = torch.tensor(float(rank)).half()
    return weights


def write_random_sdxl(path: Path, dtype: torch.dtype) -> None:
    """A full-size SDXL base checkpoint of random weights in the release file's key layout (as bench_inference.py's
    generator), written tensor by tensor so that memory holds one tensor at a time, not the 7-14 GB file."""
    from engine.models.clip import CLIPTextConfig, CLIPTextModel
    from engine.models.unet import UNetConfig, UNetModel
    from engine.models.vae import AutoencoderKL, VAEConfig
    from tests.tiny_models import to_openclip

    with torch.device("meta"):
        parts = [("model.diffusion_model.", UNetModel(UNetConfig.sdxl_base()).state_dict()),
                 ("conditioner.embedders.0.transformer.", CLIPTextModel(CLIPTextConfig.clip_l()).state_dict()),
                 ("conditioner.embedders.1.model.",
                  to_openclip(dict(CLIPTextModel(CLIPTextConfig.vit_bigg()).state_dict()))),
                 ("first_stage_model.", AutoencoderKL(VAEConfig.sd()).state_dict())]
    shapes = {prefix + k: (tuple(v.shape), v.dtype if not v.is_floating_point() else dtype)
              for prefix, sd in parts for k, v in sd.items()}
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, offset = {}, 0
    for key, (shape, kind) in shapes.items():
        size = math.prod(shape) * torch.empty((), dtype=kind).element_size()
        header[key] = {"dtype": names[kind], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for key, (shape, kind) in shapes.items():
            if kind.is_floating_point:
                tensor = (torch.randn(shape, generator=generator) * 0.02).to(kind)
            else:  # position ids
                tensor = torch.arange(shape[-1]).expand(shape).contiguous()
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def prepare_models(models: Path, lora_rank: int, need_sdxl: bool,
                   checkpoint_dtype: torch.dtype = torch.float16) -> dict[str, float]:
    """Write the example's model files under `models/` unless present; returns generation seconds per file."""
    from safetensors.torch import save_file

    seconds = {}
    u2net = models / "background_removal" / "u2net.pth"
    if not u2net.exists():
        u2net.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        torch.save(random_u2net_weights(), u2net)
        seconds["u2net.pth"] = round(time.perf_counter() - started, 1)
    if not need_sdxl:
        return seconds
    lora = models / "loras" / "pixel-art-xl-v1.1.safetensors"
    if not lora.exists():
        lora.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        save_file(random_lora(lora_rank), str(lora))
        seconds[lora.name] = round(time.perf_counter() - started, 1)
    checkpoint = models / "checkpoints" / "sd_xl_base_1.0.safetensors"
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        write_random_sdxl(checkpoint, checkpoint_dtype)
        seconds[checkpoint.name] = round(time.perf_counter() - started, 1)
    return seconds


# ---------------------------------------------------------------------------------------------------------------
# Part 1: the post-processing chain, node by node


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[dict[str, float], Any]:
    """Median and fastest seconds of `repeats` calls (after one warm-up call), and the last result. The fastest
    is the one to compare on a shared machine, where other processes slow some runs down."""
    result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4)}, result


def postprocess_part(models: Path, device: torch.device, size: int, repeats: int) -> dict[str, Any]:
    from engine import background
    from engine.context import NodeContext
    from engine.devices import policy_for
    from engine.folders import Folders
    from engine.modelfiles import ModelFiles
    from nodes.image import ImageCutout, ImageEstimateForegroundMask, ImageScaleBy, UPSCALE_METHODS
    from nodes.mask import BinarizeMask

    scratch = Path(tempfile.mkdtemp(prefix="bench-example-folders-"))
    context = NodeContext(Folders(scratch / "in", scratch / "out", scratch / "tmp"), models=ModelFiles(models),
                          policy=policy_for(device))
    image = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))

    path = models / "background_removal" / "u2net.pth"
    load, net = timed(lambda: background.load_u2net_file(path, "u2net", device), device, repeats)
    forward = {}
    for batch in (1, 4):
        x = torch.randn(batch, 3, background.INPUT_SIZE, background.INPUT_SIZE, device=device)
        with torch.inference_mode():
            forward[f"batch_{batch}"] = timed(lambda: net(x), device, repeats)[0]

    nodes = {}
    scale_s, (small,) = timed(lambda: ImageScaleBy().upscale(image, "nearest-exact", 0.125), device, repeats)
    nodes["ImageScaleBy 0.125 nearest-exact"] = scale_s
    estimator = ImageEstimateForegroundMask()
    nodes["ImageEstimateForegroundMask u2net (load + run)"], (mask,) = timed(
        lambda: estimator.estimate_background(small, "u2net", context), device, repeats)
    nodes["ImageEstimateForegroundMask u2net (run, model loaded)"] = timed(
        lambda: background.estimate_foreground(net, small), device, repeats)[0]
    nodes["BinarizeMask 250"], (binary,) = timed(lambda: BinarizeMask().binarize(mask, 250), device, repeats)
    nodes["ImageCutout"], (cut,) = timed(lambda: ImageCutout().cutout(small, binary), device, repeats)
    nodes["ImageScaleBy 8 nearest-exact"], (big,) = timed(lambda: ImageScaleBy().upscale(cut, "nearest-exact", 8),
                                                          device, repeats)
    methods = {method: timed(lambda: ImageScaleBy().upscale(image, method, 0.5), device, repeats)[0]
               for method in UPSCALE_METHODS}
    return {
        "input": [1, size, size, 3],
        "output": list(big.shape),
        "u2net_load_from_file": load,
        "u2net_forward_320": forward,
        "nodes": nodes,
        "image_scale_by_0.5_at_input_size": methods,
    }


# ---------------------------------------------------------------------------------------------------------------
# Part 2: the example prompt through the executor


def example_part(data_dir: Path, device: str, steps: int, runs: int) -> dict[str, Any]:
    from engine.executor import Executor
    from engine.imagestore import LocalImageStore
    from engine.registry import default_registry
    from engine.settings import Settings

    prompt = example_prompt()
    asked_steps = prompt["3"]["inputs"]["steps"]
    prompt["3"]["inputs"]["steps"] = steps
    registry = default_registry()
    settings = Settings(data_dir=data_dir, device=device, max_queue=4)
    executor = Executor(settings, registry, LocalImageStore(settings.images_dir))
    events: list[tuple[float, str | None]] = []

    def listener(event: str, data: dict[str, Any], _client: str | None) -> None:
        if event == "executing":
            events.append((time.perf_counter(), data.get("node")))

    executor.add_listener(listener)
    results = []
    executor.start()
    try:
        for run in range(runs):
            prompt["3"]["inputs"]["seed"] += run  # a new seed: the sampler and everything after it run again
            events.clear()
            try:
                validated = executor.validate(prompt)
            except Exception as exc:  # the model plumbing (registry, hub, LoRA) may not be there yet
                return {"skipped": f"validation failed: {type(exc).__name__}: {exc}"}
            done = threading.Event()
            outcome: list[Any] = []
            started = time.perf_counter()
            executor.submit(validated, prompt, on_done=lambda result: (outcome.append(result), done.set()))
            done.wait()
            total_s = time.perf_counter() - started
            if outcome[0].error is not None:
                return {"skipped": f"the prompt failed: {outcome[0].error}"}
            results.append(_node_times(prompt, events, steps, total_s))
    finally:
        executor.stop()
    return {"steps_run": steps, "steps_in_prompt": asked_steps, "runs": results}


def _node_times(prompt: dict[str, Any], events: list[tuple[float, str | None]], steps: int,
                total_s: float) -> dict[str, Any]:
    """Seconds per node from consecutive `executing` events (a node runs until the next one starts)."""
    per_node = {}
    for (at, node), (until, _next) in zip(events, events[1:]):
        if node is not None:
            per_node[node] = {"class_type": prompt[node]["class_type"], "s": round(until - at, 3)}
    groups: dict[str, float] = {}
    for entry in per_node.values():
        group = GROUPS.get(entry["class_type"], "other")
        groups[group] = round(groups.get(group, 0.0) + entry["s"], 3)
    sampler = next(v["s"] for v in per_node.values() if v["class_type"] == "KSampler")
    return {"total_s": round(total_s, 3), "sampling_s_per_step": round(sampler / steps, 3), "groups_s": groups,
            "nodes": per_node}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="all", choices=["all", "postprocess", "example"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--steps", type=int, default=2, help="sampler steps of the example (the prompt asks 25)")
    parser.add_argument("--post-size", type=int, default=1024, help="side of the post-processing chain's input")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per post-processing node (median)")
    parser.add_argument("--runs", type=int, default=2, help="runs of the example (the first one cold)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--checkpoint-dtype", default="fp16", choices=["fp16", "fp32"],
                        help="dtype of the generated SDXL file (fp16 as released; fp32 is mapped in place on a CPU)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the data directory is (default: temp)")
    args = parser.parse_args()

    from engine.devices import resolve_device

    device = resolve_device(args.device)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-example-"))
    models = workdir / "data" / "models"
    generated = prepare_models(models, args.lora_rank, need_sdxl=args.part in ("all", "example"),
                               checkpoint_dtype=torch.float16 if args.checkpoint_dtype == "fp16" else torch.float32)
    report: dict[str, Any] = {"benchmark": "example", "device": str(device), "cpu_count": os.cpu_count(),
                              "torch": torch.__version__, "generated_s": generated}
    if args.part in ("all", "postprocess"):
        report["postprocess"] = postprocess_part(models, device, args.post_size, args.repeats)
        print(json.dumps(report["postprocess"]), file=sys.stderr)
    if args.part in ("all", "example"):
        report["example"] = example_part(workdir / "data", args.device, args.steps, args.runs)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
