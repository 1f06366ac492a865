"""`/metrics`: the Prometheus exposition changes as requests, prompts, cached nodes and model events happen."""
from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from engine.settings import Settings
from tests.conftest import add_input_image, invert_prompt
from tests.tiny_models import write_checkpoint

PNG = {"Accept": "image/png"}


def scrape(client) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests_count(samples, method: str, route: str, status: int) -> float:
    return value(samples, "comfy_endpoint_request_duration_seconds_count", method=method, route=route,
                 status=str(status))


def test_requests_are_counted_by_route_template_and_status(client, settings):
    add_input_image(settings)
    before = scrape(client)
    assert client.post("/api/v1/prompts", json=invert_prompt(), headers=PNG).status_code == 200
    digest_url = client.post("/api/v1/prompts", json=invert_prompt()).headers["Location"]  # a store hit
    assert client.get(digest_url).status_code == 200
    assert client.get("/api/v1/images/" + "0" * 64).status_code == 404
    assert client.get("/api/queue").status_code == 200
    assert client.get("/no/such/route").status_code == 404
    after = scrape(client)

    def added(method, route, status):
        return requests_count(after, method, route, status) - requests_count(before, method, route, status)

    assert added("POST", "/api/v1/prompts", 200) == 2
    assert added("GET", "/api/v1/images/{digest}", 200) == 1  # the template, not one label per digest
    assert added("GET", "/api/v1/images/{digest}", 404) == 1
    assert added("GET", "/api/queue", 200) == 1  # the mount's prefix is part of the route
    assert added("GET", "<unmatched>", 404) == 1
    assert added("GET", "/metrics", 200) == 1  # the first scrape itself
    assert value(after, "comfy_endpoint_request_duration_seconds_sum", method="POST", route="/api/v1/prompts",
                 status="200") > 0


def test_prompts_nodes_and_cache_hits(client, settings):
    add_input_image(settings)
    before = scrape(client)
    assert client.post("/api/v1/prompts", json=invert_prompt(), headers=PNG).status_code == 200
    rerun = client.post("/api/v1/prompts", json=invert_prompt(prefix="again"),
                        headers={**PNG, "Cache-Control": "no-cache"})
    assert rerun.status_code == 200
    assert client.post("/api/v1/prompts", json={"1": {"class_type": "TestFail", "inputs": {"value": 1}},
                                                "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}
                       ).status_code == 500
    after = scrape(client)

    def added(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert added("comfy_endpoint_prompt_duration_seconds_count", status="success") == 2
    assert added("comfy_endpoint_prompt_duration_seconds_count", status="error") == 1
    # the first prompt ran all three nodes; the second reused LoadImage and ImageInvert and ran a new SaveImage
    assert added("comfy_endpoint_node_duration_seconds_count", class_type="LoadImage") == 1
    assert added("comfy_endpoint_node_duration_seconds_count", class_type="ImageInvert") == 1
    assert added("comfy_endpoint_node_duration_seconds_count", class_type="SaveImage") == 2
    assert added("comfy_endpoint_node_cache_hits_total", class_type="ImageInvert") == 1
    assert added("comfy_endpoint_node_cache_hits_total", class_type="LoadImage") == 1
    assert added("comfy_endpoint_node_duration_seconds_sum", class_type="ImageInvert") > 0
    assert added("comfy_endpoint_node_duration_seconds_count", class_type="TestFail") == 0  # failures untimed


def test_live_state_queue_in_flight_draining_and_memory(client):
    samples = scrape(client)
    assert value(samples, "comfy_endpoint_queue_depth") == 0
    assert value(samples, "comfy_endpoint_prompts_in_flight") == 0
    assert value(samples, "comfy_endpoint_queue_limit") == 8
    assert value(samples, "comfy_endpoint_draining") == 0
    assert value(samples, "comfy_endpoint_device_memory_bytes", device="cpu", kind="rss") > 10 * 2**20
    assert value(samples, "process_resident_memory_bytes") > 0

    executor = client.app.state.executor
    from tests import graph_nodes

    wait = {"1": {"class_type": "TestWait", "inputs": {"value": 1}},
            "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}
    client.post("/prompt", json={"prompt": wait})
    client.post("/prompt", json={"prompt": {**wait, "1": {"class_type": "TestWait", "inputs": {"value": 2}}}})
    try:
        busy = scrape(client)
        assert value(busy, "comfy_endpoint_prompts_in_flight") == 2  # one running, one waiting
        assert value(busy, "comfy_endpoint_queue_depth") in (1, 2)  # 2 if the executor has not taken it yet
        executor.accepting = False
        assert value(scrape(client), "comfy_endpoint_draining") == 1
    finally:
        executor.accepting = True
        graph_nodes.RELEASE.set()


def test_model_events_become_seconds_and_bytes(client):
    executor = client.app.state.executor
    executor.emit("model_download", {"folder": "checkpoints", "name": "x.safetensors", "repo": "org/x",
                                     "bytes": 1000, "seconds": 2.5})
    executor.emit("model_load", {"folder": "loras", "name": "y.safetensors", "bytes": 300, "seconds": 0.25})
    executor.emit("model_evict", {"name": "y.safetensors", "bytes": 300})
    samples = scrape(client)
    assert value(samples, "comfy_endpoint_model_download_seconds_count", folder="checkpoints") == 1
    assert value(samples, "comfy_endpoint_model_download_seconds_sum", folder="checkpoints") == 2.5
    assert value(samples, "comfy_endpoint_model_download_bytes_total", folder="checkpoints") == 1000
    assert value(samples, "comfy_endpoint_model_load_seconds_sum", folder="loras") == 0.25
    assert value(samples, "comfy_endpoint_model_load_bytes_total", folder="loras") == 300
    assert value(samples, "comfy_endpoint_model_evictions_total") == 1
    assert value(samples, "comfy_endpoint_model_evicted_bytes_total") == 300


def test_a_real_checkpoint_load_is_measured(make_client, tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "data", max_queue=8)
    checkpoint = write_checkpoint(settings.models_dir / "checkpoints", "sd1")
    client = make_client(settings)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint.name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["1", 0],
                                                   "positive": ["2", 0], "negative": ["2", 0],
                                                   "latent_image": ["3", 0]}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "tiny"}},
    }
    assert client.post("/api/v1/prompts", json=prompt).status_code == 200
    samples = scrape(client)
    loaded = sum(v for (name, _labels), v in samples.items() if name == "comfy_endpoint_model_load_bytes_total")
    assert loaded > 0, "the checkpoint's load reached no model_load event"
    assert value(samples, "comfy_endpoint_node_duration_seconds_count", class_type="KSampler") == 1
