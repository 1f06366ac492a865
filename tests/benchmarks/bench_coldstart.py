"""Benchmark: a cold start broken down, with weights coming from a hub (a local fake one, tests/fake_hub.py).

1. download throughput: `Hub.fetch` of N MB of random bytes from the loopback fake hub into an empty hub cache,
   against a plain file copy of the same bytes on the same disk (the ratio says what the hub path costs), and
   the sha256 verification on its own;
2. checkpoint load from the warm cache: `load_checkpoint` of the downloaded checkpoint (tiny by default;
   `--checkpoint PATH` for a mid-size or real one);
3. process start -> ready: `python -m handler.cli serve` until `/readyz` answers 200;
4. first and second request latency for the same prompt on that server (the second is answered from the image
   store; a third with another seed measures a warm model), the checkpoint named through a registry
   entry the fake hub serves (the first request then includes the download), or, while the executor does not
   resolve registry names yet, placed in models/checkpoints (`first_request_downloads` says which).

Prints one JSON object. Example: `python tests/benchmarks/bench_coldstart.py --mb 512`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from engine.hub import Hub, HubFile, sha256_of  # noqa: E402
from tests.fake_hub import FakeHub  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def drop_page_cache_hint(path: Path) -> None:
    """Ask the kernel to forget a file's pages so a copy reads the disk, like the download writes it (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (AttributeError, OSError):
        pass


def download_vs_copy(hub: FakeHub, work: Path, megabytes: int) -> dict:
    data = os.urandom(megabytes * 1_000_000)
    hub.publish("bench/blobs", "random.bin", data)
    source = work / "source.bin"
    source.write_bytes(data)
    drop_page_cache_hint(source)
    started = time.perf_counter()
    shutil.copyfile(source, work / "copy.bin")
    copy_s = time.perf_counter() - started

    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(work / "hf-download")}
    started = time.perf_counter()
    path = Hub(retries=1, environ=env).fetch(HubFile("bench/blobs", "random.bin"))
    hub_s = time.perf_counter() - started
    started = time.perf_counter()
    digest = sha256_of(path)
    verify_s = time.perf_counter() - started
    assert digest == hashlib.sha256(data).hexdigest()
    nbytes = len(data)
    return {"bytes": nbytes, "hub_s": round(hub_s, 3), "copy_s": round(copy_s, 3),
            "hub_MBps": round(nbytes / 1e6 / hub_s, 1), "copy_MBps": round(nbytes / 1e6 / copy_s, 1),
            "hub_over_copy_time": round(hub_s / copy_s, 2), "sha256_s": round(verify_s, 3),
            "sha256_MBps": round(nbytes / 1e6 / verify_s, 1)}


def warm_load(path: Path) -> float:
    import torch

    from engine.checkpoints import load_checkpoint
    from engine.devices import policy_for

    load_checkpoint(path, policy_for(torch.device("cpu")))  # page cache warm, imports done
    started = time.perf_counter()
    load_checkpoint(path, policy_for(torch.device("cpu")))
    return time.perf_counter() - started


def get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def post_prompt(url: str, prompt: dict) -> tuple[float, int, str]:
    body = json.dumps({"prompt": prompt}).encode()
    request = urllib.request.Request(url + "/api/v1/prompts", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "image/png"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            status, text = response.status, ""
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode(errors="replace")[:500]
    return time.perf_counter() - started, status, text


def prompt_for(ckpt: str, size: int, steps: int, seed: int = 1) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bench"}},
    }


def server_run(hub: FakeHub, work: Path, checkpoint: bytes, size: int, steps: int) -> dict:
    """Start the service, wait for /readyz, send the same prompt twice."""
    digest = hashlib.sha256(checkpoint).hexdigest()
    hub.publish("bench/checkpoints", "bench.safetensors", checkpoint)
    registry = work / "registry.json"
    registry.write_text(json.dumps({"models": [{
        "name": "bench_hub.safetensors", "folder": "checkpoints", "repo": "bench/checkpoints",
        "path": "bench.safetensors", "revision": "main", "sha256": digest, "size": len(checkpoint)}]}))
    data_dir = work / "data"
    # the same bytes under a local name too, for an executor that does not resolve registry names yet
    (data_dir / "models" / "checkpoints").mkdir(parents=True)
    (data_dir / "models" / "checkpoints" / "bench_local.safetensors").write_bytes(checkpoint)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(work / "hf-server")}
    env.pop("HF_HUB_OFFLINE", None)
    command = [sys.executable, "-m", "handler.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(data_dir), "--model-registry", str(registry), "--log-level", "warning"]
    log_path = work / "server.log"
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        try:
            while get_status(url + "/readyz") != 200:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited: {log_path.read_text(errors='replace')[-2000:]}")
                if time.perf_counter() - started > 300:
                    raise RuntimeError("the server was not ready within 300 s")
                time.sleep(0.05)
            ready_s = time.perf_counter() - started
            gets_before = hub.gets("bench/checkpoints", "bench.safetensors")
            first_s, status, text = post_prompt(url, prompt_for("bench_hub.safetensors", size, steps))
            downloads = status == 200
            if not downloads:  # registry names not resolved by this executor: measure with the local file
                first_s, status, text = post_prompt(url, prompt_for("bench_local.safetensors", size, steps))
                ckpt = "bench_local.safetensors"
            else:
                ckpt = "bench_hub.safetensors"
            if status != 200:
                raise RuntimeError(f"the first request answered {status}: {text}")
            second_s, status, text = post_prompt(url, prompt_for(ckpt, size, steps))
            if status != 200:
                raise RuntimeError(f"the second request answered {status}: {text}")
            # the same prompt again is answered from the image store; another seed runs the sampler on the
            # resident model, which is what a second user's request costs
            reseeded_s, status, text = post_prompt(url, prompt_for(ckpt, size, steps, seed=2))
            if status != 200:
                raise RuntimeError(f"the reseeded request answered {status}: {text}")
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    return {"process_start_to_ready_s": round(ready_s, 3), "first_request_s": round(first_s, 3),
            "second_request_s": round(second_s, 3), "second_request_other_seed_s": round(reseeded_s, 3),
            "first_request_downloads": downloads,
            "hub_gets_during_requests": hub.gets("bench/checkpoints", "bench.safetensors") - gets_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="megabytes for the download-vs-copy measurement")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a checkpoint to serve and load (default: a tiny random SD1 checkpoint)")
    parser.add_argument("--size", type=int, default=64, help="image side for the request latency")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="comfy-endpoint-coldstart-"))
    try:
        if args.checkpoint is None:
            from tests.tiny_models import write_checkpoint

            checkpoint_path = write_checkpoint(work / "src", "sd1")
        else:
            checkpoint_path = args.checkpoint
        checkpoint = checkpoint_path.read_bytes()
        with FakeHub(chunk_size=1 << 20) as hub:
            result = {"download": download_vs_copy(hub, work, args.mb)}
            env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(work / "hf-load")}
            hub.publish("bench/checkpoints", "bench.safetensors", checkpoint)
            cached = Hub(retries=1, environ=env).fetch(HubFile("bench/checkpoints", "bench.safetensors"))
            result["checkpoint"] = {"bytes": len(checkpoint), "name": checkpoint_path.name}
            result["checkpoint_load_warm_cache_s"] = round(warm_load(cached), 3)
            result.update(server_run(hub, work, checkpoint, args.size, args.steps))
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
