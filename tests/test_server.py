"""The real command line: `comfy-endpoint run`, `--help`, and a served process whose disk fills up."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import invert_prompt

CLI = [sys.executable, "-m", "handler.cli"]


def cli(*args, stdin=None, cwd=None):
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd)


def noise_png(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def test_help_explains_every_flag():
    serve = cli("serve", "--help")
    assert serve.returncode == 0
    for flag in ("--host", "--port", "--data-dir", "--max-queue", "--max-body-bytes", "COMFY_ENDPOINT_PORT"):
        assert flag in serve.stdout
    run = cli("run", "--help")
    assert run.returncode == 0 and "--out" in run.stdout and "standard input" in run.stdout


def test_bad_flag_value_is_a_usage_error():
    result = cli("serve", "--port", "eighty")
    assert result.returncode == 2 and "--port" in result.stderr


def test_run_writes_outputs(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    noise_png(data / "input" / "in.png", 16)
    prompt_file = tmp_path / "prompt.json"
    prompt_file.write_text(json.dumps({"prompt": invert_prompt(prefix="batch/job")}))
    result = cli("run", str(prompt_file), "--out", str(out), "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "success"
    assert summary["files"] == [str((out / "batch" / "job_00001_.png").resolve())]
    written = np.asarray(Image.open(summary["files"][0]))
    source = np.asarray(Image.open(data / "input" / "in.png")).astype(np.float32) / np.float32(255)
    assert (written == np.clip(255 * (1 - source), 0, 255).astype(np.uint8)).all()


def test_run_reads_stdin_and_reports_invalid_prompts(tmp_path):
    data = tmp_path / "data"
    noise_png(data / "input" / "in.png", 8)
    ok = cli("run", "-", "--data-dir", str(data), stdin=json.dumps(invert_prompt()))
    assert ok.returncode == 0, ok.stderr
    assert (data / "output" / "ComfyUI_00001_.png").is_file()
    bad = cli("run", "-", "--data-dir", str(data), stdin=json.dumps(invert_prompt(image="missing.png")))
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["error"]["type"] == "prompt_outputs_failed_validation"
    garbage = cli("run", "-", "--data-dir", str(data), stdin="{oops")
    assert garbage.returncode == 1 and "not valid JSON" in json.loads(garbage.stdout)["error"]["message"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


@pytest.fixture
def full_disk_server(tmp_path):
    """A served process whose output folder is a 64 KiB tmpfs, in a mount namespace of its own."""
    if shutil.which("unshare") is None:
        pytest.fail("util-linux's unshare is needed to give the server a small file system")
    data, port = tmp_path / "data", free_port()
    (data / "output").mkdir(parents=True)
    noise_png(data / "input" / "noise.png", 256)
    namespace = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "-rm"]
    mount = f'mount -t tmpfs -o size=64k tmpfs "{data / "output"}" && exec "$0" "$@"'
    process = subprocess.Popen([*namespace, "sh", "-c", mount, *CLI, "serve", "--data-dir", str(data),
                                "--port", str(port), "--log-level", "warning"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process)
        # the tmpfs is visible only inside the server's mount namespace, seen here through /proc/PID/root
        yield base, Path(f"/proc/{process.pid}/root") / data.relative_to("/")
    finally:
        process.terminate()
        process.wait(30)


def test_full_disk_is_507_and_leaves_no_partial_file(full_disk_server):
    base, data = full_disk_server
    r = httpx.post(f"{base}/api/v1/prompts", json=invert_prompt(image="noise.png"), timeout=60)
    assert r.status_code == 507, r.text
    assert "no space left" in r.json()["error"]["message"]
    assert os.listdir(data / "output") == []
    small = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "small"}}}
    after = httpx.post(f"{base}/api/v1/prompts", json=small, timeout=60)
    assert after.status_code == 200  # the server keeps serving
    assert os.listdir(data / "output") == ["small_00001_.png"]
