"""Start-up preload and warm-up through a real app: `/readyz` answers 503 with the phase until both are done, then
200; a failure keeps 503 with its reason; `/healthz` answers 200 throughout."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from engine.executor import Executor
from engine.modelfiles import ModelFiles
from engine.residency import ModelCache
from engine.settings import Settings
from engine.startup import StartupError, preload_entries, read_prompt
from handler.app import create_app
from tests import graph_nodes
from tests.tiny_models import write_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(folder, "sd1", name="a.safetensors")
    return folder


@pytest.fixture
def loads(monkeypatch) -> list[dict]:
    """Every model_load event of the app's executor, including those of start-up. Also gives the executor its
    ModelCache where the tree does not set it up yet (a no-op once it does)."""
    seen: list[dict] = []
    init, context = Executor.__init__, Executor.context

    def wired_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not hasattr(self, "resident"):
            self.resident = ModelCache.from_settings(self.settings, self.policy.device, events=self.emit)
        self.add_listener(lambda event, data, client_id=None: seen.append(data) if event == "model_load" else None)

    def wired_context(self, *args, **kwargs):
        ctx = context(self, *args, **kwargs)
        if getattr(ctx, "resident", None) is None:
            ctx.resident = self.resident
        return ctx

    monkeypatch.setattr(Executor, "__init__", wired_init)
    monkeypatch.setattr(Executor, "context", wired_context)
    return seen


@pytest.fixture
def gate(monkeypatch) -> threading.Event:
    """Holds every model lookup until set, so the preloading phase can be observed."""
    opened = threading.Event()
    find = ModelFiles.find

    def held_find(self, *args, **kwargs):
        opened.wait(10)
        return find(self, *args, **kwargs)

    monkeypatch.setattr(ModelFiles, "find", held_find)
    yield opened
    opened.set()


def make_settings(tmp_path: Path, checkpoints: Path, prompt: dict | str | None = None, **kwargs) -> Settings:
    warmup = None
    if prompt is not None:
        warmup = tmp_path / "warmup.json"
        warmup.write_text(prompt if isinstance(prompt, str) else json.dumps(prompt))
    settings = Settings(data_dir=tmp_path / "data", warmup_prompt=warmup, **kwargs)
    settings.models_dir.mkdir(parents=True)
    (settings.models_dir / "checkpoints").symlink_to(checkpoints, target_is_directory=True)
    return settings


def txt2img_and_wait() -> dict:
    """A txt2img prompt on a.safetensors, plus a branch that waits for the test (graph_nodes.RELEASE)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "5": {"class_type": "KSampler", "inputs": {
            "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["2", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "8": {"class_type": "TestIntConst", "inputs": {"value": 1}},
        "9": {"class_type": "TestWait", "inputs": {"value": ["8", 0]}},
        "10": {"class_type": "TestCollect", "inputs": {"value": ["9", 0]}},
    }


def status(client: TestClient) -> tuple[int, dict]:
    response = client.get("/readyz")
    return response.status_code, response.json()


def wait_for(client: TestClient, wanted: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, body = status(client)
        if body["status"] == wanted:
            return body
        time.sleep(0.02)
    raise AssertionError(f"/readyz never said {wanted!r}; last: {code} {body}")


def test_preload_load_and_warm_up_gate_readiness(tmp_path, checkpoints, registry, loads, gate):
    settings = make_settings(tmp_path, checkpoints, txt2img_and_wait(), preload="checkpoints/a.safetensors",
                             preload_load=True)
    with TestClient(create_app(settings, registry)) as client:
        assert status(client) == (503, {"status": "preloading"})  # the server answers while weights arrive
        assert client.get("/healthz").status_code == 200
        gate.set()
        wait_for(client, "warming_up")
        assert len(loads) == 3  # unet, text, vae loaded by the preload
        assert status(client)[0] == 503 and client.get("/healthz").status_code == 200
        graph_nodes.RELEASE.set()
        body = wait_for(client, "ready")
        assert client.get("/readyz").status_code == 200 and body["queue_remaining"] == 0
        assert len(loads) == 3  # the warm-up prompt found the preloaded models resident
        assert graph_nodes.CALLS["Collect"] == 1
        assert len(client.app.state.executor.resident.entries()) == 3


def test_preload_without_load_only_fetches(tmp_path, checkpoints, registry, loads):
    settings = make_settings(tmp_path, checkpoints, preload="checkpoints/a.safetensors")
    with TestClient(create_app(settings, registry)) as client:
        wait_for(client, "ready")
        assert loads == [] and client.app.state.executor.resident.entries() == []


def test_a_failing_warm_up_keeps_the_replica_out_of_rotation(tmp_path, checkpoints, registry, loads):
    prompt = {"1": {"class_type": "TestIntConst", "inputs": {"value": 7}},
              "2": {"class_type": "TestFail", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "TestCollect", "inputs": {"value": ["2", 0]}}}
    with TestClient(create_app(make_settings(tmp_path, checkpoints, prompt), registry)) as client:
        body = wait_for(client, "warmup_failed")
        assert "refusing 7" in body["error"]
        time.sleep(0.1)
        assert status(client) == (503, body)  # for good
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("preload, prompt, phase, fragment", [
    ("checkpoints/missing.safetensors", None, "preload_failed", "missing.safetensors"),
    ("missing.safetensors", None, "preload_failed", "needs a folder"),
    ("", "{not json", "warmup_failed", "not JSON"),
    ("", {"1": {"class_type": "TestCollect", "inputs": {}}}, "warmup_failed", "invalid"),
])
def test_start_up_failures_say_why(tmp_path, checkpoints, registry, loads, preload, prompt, phase, fragment):
    settings = make_settings(tmp_path, checkpoints, prompt, preload=preload)
    with TestClient(create_app(settings, registry)) as client:
        assert fragment in wait_for(client, phase)["error"]
        assert client.get("/healthz").status_code == 200


def test_nothing_to_do_is_ready_at_once(tmp_path, checkpoints, registry, loads):
    with TestClient(create_app(make_settings(tmp_path, checkpoints), registry)) as client:
        assert status(client)[0] == 200


def test_preload_entries_and_prompt_files(tmp_path):
    assert preload_entries(" checkpoints/a.safetensors, loras/sub/b.safetensors ,") == [
        ("checkpoints", "a.safetensors"), ("loras", "sub/b.safetensors")]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"prompt": {"1": {"class_type": "X", "inputs": {}}}, "client_id": "c"}))
    assert read_prompt(wrapped) == {"1": {"class_type": "X", "inputs": {}}}
    wrapped.write_text("[1, 2]")
    with pytest.raises(StartupError, match="API-format"):
        read_prompt(wrapped)
    with pytest.raises(StartupError, match="could not be read"):
        read_prompt(tmp_path / "absent.json")
