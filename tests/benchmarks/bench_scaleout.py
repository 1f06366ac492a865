"""Benchmark of scale-out (a script, not a test): three replicas behind nginx against one, and the S3 store's
added latency against the local directory. Prints one JSON object; progress goes to stderr.

1. scaling: the same load (`--requests` tiny-SD1 txt2img prompts, every one a new seed so each runs, at
   `--concurrency`) through nginx (the shipped configuration) to one replica, then to three, taking turns for
   `--rounds` rounds; throughput, p50 and p99 latency of each (the median round), and the ratio of the
   throughputs. The three replicas run all along; the one-replica set-up is a second nginx in front of the first
   of them only. Each replica computes with `--threads` torch threads (1 by default, as one replica per GPU has
   its device to itself): on a machine with fewer cores than replicas the ratio is bounded by the cores (at most
   2 on 2 cores), not by the service. So the same comparison runs a second workload, "device_bound": prompts that
   hold their replica for `--device-seconds` without using the CPU (the test-only TestSlow node), standing for
   replicas that each wait on a GPU of their own; there the ratio shows what the balancer and the replicas
   themselves allow.
2. store: one replica on the local directory, one on a SeaweedFS S3 store (loopback); for a model-free prompt
   (LoadImage -> ImageInvert -> SaveImage of `--image-size` noise, a PNG as large as a photograph's; each run
   writes a file and a digest entry, which the S3 store also publishes) the latency of a run (`Cache-Control:
   no-cache`), of a digest hit, and of `GET /api/v1/images/{digest}`, one request at a time; the difference is
   what the store adds (its PUTs and GETs over loopback HTTP).

Run from the repository root (needs nginx and `weed`, as the tests do):

    .venv/bin/python tests/benchmarks/bench_scaleout.py
    .venv/bin/python tests/benchmarks/bench_scaleout.py --requests 60 --concurrency 12 --steps 8 --size 256
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from container.fleet import nginx, seaweedfs, start_replica, stop, wait_ready  # noqa: E402
from tests.tiny_models import write_checkpoint  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def txt2img(seed: int, size: int, steps: int) -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd1.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bench"}},
    }


def device_bound(seed: int, seconds: float) -> dict[str, Any]:
    """A prompt that holds its replica's executor for `seconds` without using the CPU (the test-only TestSlow
    node sleeps): a stand-in for a replica waiting on a GPU of its own."""
    steps = max(1, round(seconds / 0.01))
    return {"1": {"class_type": "TestSlow", "inputs": {"value": seed % 0xFFFFFF, "steps": steps, "delay": 0.01}},
            "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                         "color": ["1", 0]}},  # new seed: nothing cached
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "device"}}}


def inverted_noise() -> dict[str, Any]:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": "noise.png"}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "store"}}}


def write_noise(path: Path, size: int) -> None:
    """Noise, so that the PNG is as large as a photograph's (flat colours would compress to nothing)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p50_ms": round(pick(0.5) * 1e3, 2), "p99_ms": round(pick(0.99) * 1e3, 2),
            "mean_ms": round(statistics.fmean(ordered) * 1e3, 2)}


def load(url: str, prompts: list[dict], concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    answered_by: Counter[str] = Counter()  # the replica that answered (nginx's X-Upstream, last address)
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        def send(prompt: dict) -> None:
            started = time.perf_counter()
            response = client.post("/api/v1/prompts", json=prompt, headers={"Cache-Control": "no-cache"})
            latencies.append(time.perf_counter() - started)
            statuses[response.status_code] += 1
            answered_by[response.headers.get("x-upstream", "?").split(", ")[-1]] += 1

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(send, prompts))
        elapsed = time.perf_counter() - started
    return {"requests": len(prompts), "seconds": round(elapsed, 2),
            "throughput_per_s": round(len(prompts) / elapsed, 3), **percentiles(latencies),
            "statuses": dict(statuses), "answered_by": sorted(answered_by.values(), reverse=True)}


def scaling(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Three replicas, two balancers: one in front of the first replica only, one in front of all three. The two
    set-ups take turns for `--rounds` rounds, so that a change in the machine's other load hits both alike."""
    checkpoints = work / "checkpoints"
    write_checkpoint(checkpoints, "sd1")
    env = {"OMP_NUM_THREADS": str(args.threads), "COMFY_ENDPOINT_EXTRA_NODES": "tests.graph_nodes"}
    workloads = {
        "tiny_sd1": lambda seed: txt2img(seed, args.size, args.steps),
        "device_bound": lambda seed: device_bound(seed, args.device_seconds),
    }
    with ExitStack() as stack:
        replicas = []
        for index in range(3):
            data = work / f"replica-{index}"
            (data / "models").mkdir(parents=True)
            (data / "models" / "checkpoints").symlink_to(checkpoints, target_is_directory=True)
            replica = start_replica(data, env=env, cwd=REPO_ROOT, args=["--max-queue", "256", "--log-level",
                                                                        "warning"])
            stack.callback(stop, replica.process, 30)
            replicas.append(replica)
        for replica in replicas:
            wait_ready(replica)
        balancers = {count: stack.enter_context(nginx(work / f"nginx{count}",
                                                      [f"127.0.0.1:{r.port}" for r in replicas[:count]]))
                     for count in (1, 3)}
        load(balancers[3].url, [txt2img(10_000 + i, args.size, args.steps) for i in range(6)], 3)  # warm all
        results: dict[str, Any] = {}
        seed = 0
        for name, make in workloads.items():
            runs: dict[int, list[dict[str, Any]]] = {1: [], 3: []}
            for round_number in range(args.rounds):
                for count in (1, 3):
                    log(f"scaling {name}: round {round_number + 1}, {count} replica(s), {args.requests} prompts "
                        f"at concurrency {args.concurrency}")
                    runs[count].append(load(balancers[count].url, [make(seed + i) for i in range(args.requests)],
                                            args.concurrency))
                    seed += args.requests  # every prompt new: each one runs
            results[name] = summarise(runs)
    return results


def summarise(runs: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """The median round of each set-up (by throughput), every round's throughput, and the ratio of medians."""
    result: dict[str, Any] = {}
    for count, measured in runs.items():
        median = sorted(measured, key=lambda r: r["throughput_per_s"])[len(measured) // 2]
        result[f"replicas_{count}"] = {**median, "throughput_per_s_each_round": [r["throughput_per_s"]
                                                                                  for r in measured]}
    result["throughput_ratio_3_vs_1"] = round(result["replicas_3"]["throughput_per_s"]
                                              / result["replicas_1"]["throughput_per_s"], 3)
    return result


def timed(client: httpx.Client, method: str, path: str, repeats: int, **kwargs) -> dict[str, float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        response = client.request(method, path, **kwargs)
        seconds.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:200]}")
    return percentiles(seconds)


def store_latency(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    with seaweedfs(work / "s3") as store:
        for name, env in (("local", {}), ("s3", store.env("bench"))):
            write_noise(work / f"store-{name}" / "input" / "noise.png", args.image_size)
            replica = start_replica(work / f"store-{name}", env=env, cwd=REPO_ROOT, args=["--log-level", "warning"])
            try:
                wait_ready(replica)
                with httpx.Client(base_url=replica.url, timeout=60) as client:
                    prompt = inverted_noise()
                    first = client.post("/api/v1/prompts", json=prompt)  # warm-up, and the digest URL
                    location = first.headers["location"]
                    log(f"store: {name}")
                    results[name] = {
                        "run_no_cache": timed(client, "POST", "/api/v1/prompts", args.store_repeats, json=prompt,
                                              headers={"Cache-Control": "no-cache"}),
                        "digest_hit": timed(client, "POST", "/api/v1/prompts", args.store_repeats, json=prompt),
                        "get_image": timed(client, "GET", location, args.store_repeats),
                        "png_bytes": len(client.get(location).content),
                    }
            finally:
                stop(replica.process, 30)
    results["added_p50_ms"] = {kind: round(results["s3"][kind]["p50_ms"] - results["local"][kind]["p50_ms"], 2)
                               for kind in ("run_no_cache", "digest_hit", "get_image")}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=96, help="prompts per round and set-up")
    parser.add_argument("--rounds", type=int, default=3, help="turns of one replica, then three (median kept)")
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--size", type=int, default=128, help="txt2img width and height")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--device-seconds", type=float, default=0.1,
                        help="how long each device-bound prompt holds its replica")
    parser.add_argument("--image-size", type=int, default=512, help="the store benchmark's image side")
    parser.add_argument("--store-repeats", type=int, default=50)
    parser.add_argument("--skip-scaling", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_scaleout_") as tmp:
        work = Path(tmp)
        result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "settings": vars(args)}
        if not args.skip_scaling:
            result["scaling"] = scaling(work, args)
        result["store"] = store_latency(work, args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
