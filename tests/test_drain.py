"""Graceful drain of a served process: SIGTERM lets the running prompt finish, refuses new work with 503, and the
process exits 0 within the grace period; prompts still running when the grace ends are cut with a 503."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from container.fleet import Replica, free_port, start_replica, stop, wait_ready, wait_until

ROOT = Path(__file__).resolve().parents[1]
TEST_NODES = {"COMFY_ENDPOINT_EXTRA_NODES": "tests.graph_nodes"}


def slow_image_prompt(seconds: float, width: int = 8) -> dict:
    """TestSlow feeds EmptyImage's width, so the image exists only once the slow node has finished."""
    steps = max(1, round(seconds / 0.1))
    return {
        "1": {"class_type": "TestSlow", "inputs": {"value": width, "steps": steps, "delay": 0.1}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": ["1", 0], "height": 4, "batch_size": 1, "color": 0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "slow"}},
    }


def waiting_prompt(value: int) -> dict:
    """TestWait blocks (checking interrupts) until released, which never happens in a served process: 10 s."""
    return {
        "1": {"class_type": "TestWait", "inputs": {"value": value}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": ["1", 0], "height": 4, "batch_size": 1, "color": 0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "wait"}},
    }


@pytest.fixture
def serve(tmp_path):
    started: list[Replica] = []

    def start(grace_s: int) -> Replica:
        replica = start_replica(tmp_path / f"data{len(started)}", env=TEST_NODES, cwd=ROOT,
                                args=["--drain-grace-s", str(grace_s), "--log-level", "warning"])
        started.append(replica)
        wait_ready(replica)
        return replica

    yield start
    for replica in started:
        stop(replica.process, timeout_s=5)


def post_in_background(url: str, prompt: dict) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(
        httpx.post(f"{url}/api/v1/prompts", json=prompt, headers={"Accept": "image/png"}, timeout=60)))
    thread.start()
    return thread, answers


def wait_running(url: str, count: int = 1) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        queue = httpx.get(f"{url}/queue", timeout=5).json()
        if len(queue["queue_running"]) + len(queue["queue_pending"]) >= count and queue["queue_running"]:
            return
        time.sleep(0.02)
    raise AssertionError("the prompts never started")


def test_sigterm_finishes_the_running_prompt_refuses_new_ones_and_exits_0(serve):
    grace = 15
    replica = serve(grace)
    thread, answers = post_in_background(replica.url, slow_image_prompt(seconds=3, width=8))
    wait_running(replica.url)

    replica.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    ready = httpx.get(f"{replica.url}/readyz", timeout=5)
    assert (ready.status_code, ready.json()["status"]) == (503, "draining")
    refused = httpx.post(f"{replica.url}/api/v1/prompts", json=slow_image_prompt(seconds=0.1), timeout=10)
    assert refused.status_code == 503, refused.text  # the socket is still open: a 503 the balancer retries
    assert refused.json()["error"]["type"] == "unavailable" and refused.headers["Retry-After"] == "1"
    assert replica.process.poll() is None  # the long prompt is still running

    thread.join(30)
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert Image.open(io.BytesIO(answers[0].content)).size == (8, 4)
    assert replica.process.wait(grace) == 0
    assert time.monotonic() - signalled < grace
    with pytest.raises(httpx.ConnectError):  # gone: the balancer's `error` case
        httpx.get(f"{replica.url}/healthz", timeout=2)


def test_prompts_still_running_when_the_grace_ends_are_cut_with_503(serve):
    grace = 3  # TestWait would run 10 s
    replica = serve(grace)
    running, running_answer = post_in_background(replica.url, waiting_prompt(5))
    wait_running(replica.url)
    queued, queued_answer = post_in_background(replica.url, waiting_prompt(6))
    wait_running(replica.url, count=2)

    replica.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    running.join(30)
    queued.join(30)
    for answers in (running_answer, queued_answer):  # 503, not 500: the balancer runs them elsewhere
        assert answers and answers[0].status_code == 503, answers and answers[0].text
    assert replica.process.wait(grace + 5) == 0
    assert time.monotonic() - signalled <= grace + 0.5


def entrypoint(tmp_path: Path, port: int) -> subprocess.Popen:
    """The container's entrypoint as the image runs it (the platform's PORT; loopback here)."""
    with open(tmp_path / "entrypoint.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "container.entrypoint", "--data-dir", str(tmp_path / "data"),
                                 "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PORT": str(port), "COMFY_ENDPOINT_HOST": "127.0.0.1"})


def test_the_container_entrypoint_serves_on_port_and_an_idle_one_exits_0_at_once(tmp_path):
    port = free_port()
    process = entrypoint(tmp_path, port)  # the default grace, 30 s
    try:
        wait_until(f"http://127.0.0.1:{port}/readyz", process, 60)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert process.wait(15) == 0
        assert time.monotonic() - signalled < 5  # nothing in flight: no use of the grace
    finally:
        stop(process)


def test_sigterm_before_the_server_is_up_exits_0(tmp_path):
    """Before the server installs its handlers (while importing), the entrypoint's own handler ends it cleanly:
    as a container's PID 1 the signal would otherwise be ignored."""
    process = entrypoint(tmp_path, free_port())
    try:
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        stop(process)
