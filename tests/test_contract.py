"""The API contract users were given (shared/openapi.yaml): every operation exercised through the app with
realistic requests, the error cases the spec declares, ComfyUI's routes under the `/api` prefix too, and each
answer checked against the spec by `tests.contract.check_response` (its docstring lists the spec's defects)."""
from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from starlette.testclient import TestClient

from engine.settings import Settings
from tests import contract, graph_nodes
from tests.conftest import add_input_image, invert_prompt, png_bytes

PREFIXES = ("", "/api")  # ComfyUI's routes are served at the root and under /api (DESIGN §4)
LOCATION = re.compile(r"/api/v1/images/(?P<hex>[0-9a-f]{64})")


# -- helpers ---------------------------------------------------------------------------------------------------
def call(client: TestClient, method: str, url: str, template: str | None = None, **kwargs: Any):
    """Send a request; check the answer against the spec's operation `template` (default: the URL's path)."""
    response = client.request(method, url, **kwargs)
    return contract.check_response(method, template or urlsplit(url).path, response)


def spec_digest(data: dict | str) -> str:
    """The spec's Python hashing function, verbatim."""
    json_str = data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))
    return hashlib.sha256(json_str.encode('utf-8')).hexdigest()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)
    return result


def preview_prompt(image: str = "in.png") -> dict:
    """No SaveImage: runs, but the API route has no image to answer with."""
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def wait_prompt(value: int) -> dict:
    """TestWait blocks until graph_nodes.RELEASE is set; TestCollect makes it an output."""
    return {"1": {"class_type": "TestWait", "inputs": {"value": value}},
            "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}


def workflow_extra_data() -> dict:
    """What ComfyUI's front end sends as extra_data: the editor's workflow (shape of a saved ComfyUI workflow)."""
    node = {"id": 1, "type": "TestWait", "pos": [40, 80], "size": [315, 58], "flags": {"collapsed": False},
            "order": 0, "mode": 0, "inputs": [{"name": "value", "type": "INT", "link": None}],
            "outputs": [{"name": "INT", "type": "INT", "links": [1], "slot_index": 0}],
            "properties": {"Node name for S&R": "TestWait"}, "widgets_values": [2]}
    collect = {"id": 2, "type": "TestCollect", "pos": [400, 80], "size": [315, 58], "flags": {}, "order": 1,
               "mode": 0, "inputs": [{"name": "value", "type": "INT", "link": 1}], "outputs": [],
               "properties": {}, "widgets_values": [""]}
    return {"extra_pnginfo": {"workflow": {"last_node_id": 2, "last_link_id": 1, "nodes": [node, collect],
                                           "links": [[1, 1, 0, 2, 0, "INT"]], "groups": [], "config": {},
                                           "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}}}


def queue_prompt(client: TestClient, prompt: dict, prefix: str = "", **envelope: Any) -> str:
    """POST /prompt (ComfyUI's route); returns the prompt_id."""
    response = call(client, "POST", f"{prefix}/prompt", "/prompt", json={"prompt": prompt, **envelope})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["node_errors"] == {} and isinstance(body["number"], (int, float))
    return body["prompt_id"]


def history(client: TestClient, prefix: str = "") -> dict:
    return call(client, "GET", f"{prefix}/history", "/history").json()


def wait_history(client: TestClient, prompt_id: str) -> dict:
    return wait_until(lambda: history(client).get(prompt_id))


def wait_running(client: TestClient, prompt_id: str) -> None:
    wait_until(lambda: [item[1] for item in client.get("/queue").json()["queue_running"]] == [prompt_id])


def check_queue_tuple(item: list, prompt_id: str, prompt: dict, extra_data: dict) -> None:
    """A QueueTuple is [number, prompt_id, prompt, extra_data] (DESIGN §4; see contract defect 1)."""
    assert len(item) == 4
    number, item_id, item_prompt, item_extra = item
    assert isinstance(number, (int, float)) and not isinstance(number, bool)
    assert item_id == prompt_id
    contract.validate(item_prompt, contract.component("Prompt"))
    assert item_prompt == prompt
    contract.validate(item_extra, contract.component("ExtraData"))
    assert item_extra == extra_data


def run(client: TestClient, prompt: Any, **kwargs: Any):
    """POST /api/v1/prompts, checked against the spec."""
    return call(client, "POST", "/api/v1/prompts", json=prompt, **kwargs)


def disposition_filename(header: str) -> str:
    """The file name of a Content-Disposition value: `filename=x`, `filename="x"` or RFC 5987 `filename*=`."""
    params = dict(part.strip().split("=", 1) for part in header.split(";") if "=" in part)
    if "filename*" in params:
        charset, _, encoded = params["filename*"].split("'", 2)
        return unquote(encoded, encoding=charset or "utf-8")
    return params["filename"].strip('"')


def check_image_answer(client: TestClient, response, prompt: dict) -> str:
    """The 200 of POST /api/v1/prompts as DESIGN §4 details it; returns the digest."""
    assert response.status_code == 200, response.text
    location = response.headers["Location"]
    match = LOCATION.fullmatch(location)
    assert match, f"Location {location!r} is not /api/v1/images/<64 lowercase hex>"
    digest = match["hex"]
    assert response.headers["Digest"] == f"SHA256={digest}"
    assert digest == spec_digest(prompt)
    urls = response.json()["urls"]
    assert len(urls) == 2 and urls[0] == location
    view = urlsplit(urls[1])
    assert view.path == "/view"
    name = parse_qs(view.query)["filename"][0]
    assert name.endswith(".png")
    assert disposition_filename(response.headers["Content-Disposition"]) == name
    stored = call(client, "GET", location, "/api/v1/images/{digest}")
    viewed = call(client, "GET", urls[1], "/view")
    assert stored.status_code == viewed.status_code == 200
    assert stored.content == viewed.content and stored.content.startswith(b"\x89PNG")
    return digest


# -- every operation of the spec, with a realistic request, at the root and under /api ---------------------------
def _ran(client: TestClient, settings: Settings) -> str:
    """Run the invert prompt through the API route; its digest."""
    add_input_image(settings)
    return check_image_answer(client, run(client, invert_prompt()), invert_prompt())


def _root(client, settings, prefix):
    response = call(client, "GET", f"{prefix}/", "/")
    assert "<html" in response.text.lower()


def _embeddings(client, settings, prefix):
    folder = settings.models_dir / "embeddings"
    (folder / "style").mkdir(parents=True)
    (folder / "easynegative.safetensors").write_bytes(b"x")
    (folder / "style" / "watercolor.pt").write_bytes(b"x")
    # names relative to the folder, without the extension, as ComfyUI lists them
    assert call(client, "GET", f"{prefix}/embeddings", "/embeddings").json() == ["easynegative", "style/watercolor"]


def _extensions(client, settings, prefix):
    assert call(client, "GET", f"{prefix}/extensions", "/extensions").json() == []


def _upload_image(client, settings, prefix):
    data = png_bytes(color=(0, 255, 0, 255))
    response = call(client, "POST", f"{prefix}/upload/image", "/upload/image",
                    files={"image": ("upload.png", data, "image/png")})
    assert response.json()["name"] == "upload.png"
    assert (settings.input_dir / "upload.png").read_bytes() == data


def _view(client, settings, prefix):
    path = add_input_image(settings, "shown.png", color=(1, 2, 3, 255))
    response = call(client, "GET", f"{prefix}/view?filename=shown.png&type=input", "/view")
    assert response.content == path.read_bytes()


def _get_prompt(client, settings, prefix):
    assert call(client, "GET", f"{prefix}/prompt", "/prompt").json() == {"exec_info": {"queue_remaining": 0}}


def _post_prompt(client, settings, prefix):
    add_input_image(settings)
    prompt_id = queue_prompt(client, invert_prompt(), prefix, client_id="contract-test")
    assert wait_history(client, prompt_id)["status"]["completed"] is True


def _object_info(client, settings, prefix):
    info = call(client, "GET", f"{prefix}/object_info", "/object_info").json()
    assert {"LoadImage", "SaveImage", "PreviewImage", "TestWait"} <= set(info)
    assert info["SaveImage"]["output_node"] is True and info["ImageInvert"]["output_node"] is False
    assert info["SaveImage"]["input"]["required"]["filename_prefix"][0] == "STRING"


def _get_history(client, settings, prefix):
    add_input_image(settings)
    prompt_id = queue_prompt(client, invert_prompt())
    wait_history(client, prompt_id)
    entry = history(client, prefix)[prompt_id]
    check_queue_tuple(entry["prompt"], prompt_id, invert_prompt(), {})
    assert entry["outputs"]["3"]["images"][0]["type"] == "output"


def _post_history(client, settings, prefix):
    _ran(client, settings)
    assert history(client)
    assert call(client, "POST", f"{prefix}/history", "/history", json={"clear": True}).status_code == 200
    assert history(client) == {}


def _get_queue(client, settings, prefix):
    queue = call(client, "GET", f"{prefix}/queue", "/queue").json()
    assert queue == {"queue_running": [], "queue_pending": []}


def _post_queue(client, settings, prefix):
    assert call(client, "POST", f"{prefix}/queue", "/queue", json={"clear": True}).status_code == 200


def _interrupt(client, settings, prefix):
    assert call(client, "POST", f"{prefix}/interrupt", "/interrupt").status_code == 200  # idle: nothing to stop


def _get_image(client, settings, prefix):
    digest = _ran(client, settings)
    response = call(client, "GET", f"/api/v1/images/{digest}", "/api/v1/images/{digest}")
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")


def _get_prompts(client, settings, prefix):
    _ran(client, settings)
    assert call(client, "GET", "/api/v1/prompts").json() == invert_prompt()


def _post_prompts(client, settings, prefix):
    _ran(client, settings)


CASES: dict[tuple[str, str], Callable[[TestClient, Settings, str], None]] = {
    ("GET", "/"): _root,
    ("GET", "/embeddings"): _embeddings,
    ("GET", "/extensions"): _extensions,
    ("POST", "/upload/image"): _upload_image,
    ("GET", "/view"): _view,
    ("GET", "/prompt"): _get_prompt,
    ("POST", "/prompt"): _post_prompt,
    ("GET", "/object_info"): _object_info,
    ("GET", "/history"): _get_history,
    ("POST", "/history"): _post_history,
    ("GET", "/queue"): _get_queue,
    ("POST", "/queue"): _post_queue,
    ("POST", "/interrupt"): _interrupt,
    ("GET", "/api/v1/images/{digest}"): _get_image,
    ("GET", "/api/v1/prompts"): _get_prompts,
    ("POST", "/api/v1/prompts"): _post_prompts,
}
ROUTED = [(op, prefix) for op in CASES for prefix in PREFIXES if prefix == "" or not op[1].startswith("/api/")]


def test_every_spec_operation_has_a_case():
    assert set(CASES) == contract.operations()


@pytest.mark.parametrize("operation, prefix", ROUTED, ids=[f"{m} {prefix}{p}" for (m, p), prefix in ROUTED])
def test_operation_answers_per_contract(client, settings, operation, prefix):
    CASES[operation](client, settings, prefix)


# -- ComfyUI's routes in detail --------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", PREFIXES)
def test_upload_never_replaces_an_existing_file(client, settings, prefix):
    def upload(data: bytes) -> str:
        files = {"image": ("same.png", data, "image/png")}
        return call(client, "POST", f"{prefix}/upload/image", "/upload/image", files=files).json()["name"]

    first, second = png_bytes(color=(1, 0, 0, 255)), png_bytes(color=(2, 0, 0, 255))
    assert upload(first) == "same.png"
    assert upload(second) == "same (1).png"
    assert upload(first) == "same.png"  # identical content reuses the name
    assert (settings.input_dir / "same.png").read_bytes() == first
    assert (settings.input_dir / "same (1).png").read_bytes() == second


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("kwargs", [{"files": {"other": ("x.png", b"x", "image/png")}}, {"data": {"image": "x"}}],
                         ids=["other-part", "no-file"])
def test_upload_without_an_image_is_400(client, prefix, kwargs):
    assert call(client, "POST", f"{prefix}/upload/image", "/upload/image", **kwargs).status_code == 400


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("query, status", [
    ("filename=missing.png", 404),
    ("filename=in.png&type=output", 404),
    ("", 400),
    ("filename=in.png&type=models", 400),
    ("filename=../in.png&type=output", 403),
    ("filename=in.png&subfolder=..&type=output", 403),
    ("filename=/etc/passwd", 403),
])
def test_view_errors(client, settings, prefix, query, status):
    add_input_image(settings)
    assert call(client, "GET", f"{prefix}/view?{query}", "/view").status_code == status


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("body", [
    {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}},
    {"prompt": {"1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}},
    {"prompt": {"2": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "x"}}}},
    {"client_id": "no-prompt"},
], ids=["unknown-class", "missing-file", "dangling-link", "no-prompt"])
def test_post_prompt_invalid_is_400(client, prefix, body):
    response = call(client, "POST", f"{prefix}/prompt", "/prompt", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"]
    assert call(client, "GET", "/queue").json() == {"queue_running": [], "queue_pending": []}


@pytest.mark.parametrize("prefix", PREFIXES)
def test_queue_lists_running_and_pending_prompts(client, prefix):
    extra = workflow_extra_data()
    running = queue_prompt(client, wait_prompt(1), prefix)
    wait_running(client, running)
    pending = queue_prompt(client, wait_prompt(2), prefix, extra_data=extra)

    queue = call(client, "GET", f"{prefix}/queue", "/queue").json()
    assert len(queue["queue_running"]) == 1 and len(queue["queue_pending"]) == 1
    check_queue_tuple(queue["queue_running"][0], running, wait_prompt(1), {})
    check_queue_tuple(queue["queue_pending"][0], pending, wait_prompt(2), extra)
    assert queue["queue_running"][0][0] < queue["queue_pending"][0][0]  # lower numbers run first
    remaining = call(client, "GET", f"{prefix}/prompt", "/prompt").json()["exec_info"]["queue_remaining"]
    assert remaining == 2

    graph_nodes.RELEASE.set()
    for prompt_id, prompt, extra_data in ((running, wait_prompt(1), {}), (pending, wait_prompt(2), extra)):
        entry = wait_history(client, prompt_id)
        check_queue_tuple(entry["prompt"], prompt_id, prompt, extra_data)
        assert entry["status"]["completed"] is True
    assert call(client, "GET", f"{prefix}/queue", "/queue").json() == {"queue_running": [], "queue_pending": []}


def test_post_queue_delete_removes_a_pending_prompt(client):
    running = queue_prompt(client, wait_prompt(1))
    wait_running(client, running)
    pending = queue_prompt(client, wait_prompt(2))
    assert call(client, "POST", "/queue", json={"delete": [pending]}).status_code == 200
    queue = client.get("/queue").json()
    assert queue["queue_pending"] == [] and queue["queue_running"][0][1] == running
    graph_nodes.RELEASE.set()
    wait_history(client, running)
    assert pending not in history(client)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_interrupt_stops_the_running_prompt(client, prefix):
    prompt_id = queue_prompt(client, wait_prompt(1))
    wait_running(client, prompt_id)
    assert call(client, "POST", f"{prefix}/interrupt", "/interrupt").status_code == 200
    entry = wait_history(client, prompt_id)  # RELEASE is never set: only the interrupt ends the wait
    assert entry["status"]["completed"] is False
    assert "execution_interrupted" in [event for event, _ in entry["status"]["messages"]]


def test_post_history_deletes_by_prompt_id(client, settings):
    add_input_image(settings)
    first, second = (queue_prompt(client, invert_prompt(prefix=p)) for p in ("first", "second"))
    wait_history(client, second)
    assert call(client, "POST", "/api/history", "/history", json={"delete": [first]}).status_code == 200
    assert list(history(client)) == [second]


# -- the API routes ----------------------------------------------------------------------------------------------
def test_post_prompts_answers_urls_location_digest_and_disposition(client, settings):
    add_input_image(settings)
    response = run(client, invert_prompt(prefix="Contract"))
    check_image_answer(client, response, invert_prompt(prefix="Contract"))
    assert response.headers["Content-Disposition"] == "filename=Contract_00001_.png"


def test_post_prompts_accepts_an_envelope_and_digests_the_prompt_alone(client, settings):
    add_input_image(settings)
    response = run(client, {"prompt": invert_prompt(), "client_id": "contract-test"})
    check_image_answer(client, response, invert_prompt())


def test_post_prompts_answers_png_when_asked(client, settings):
    add_input_image(settings)
    response = run(client, invert_prompt(), headers={"Accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    digest = spec_digest(invert_prompt())
    assert response.headers["Location"] == f"/api/v1/images/{digest}"
    assert response.content == client.get(f"/api/v1/images/{digest}").content


def test_digest_is_over_the_prompt_exactly_as_sent(client, settings):
    """Key order as received, floats as Python writes them; unknown inputs (here floats and a boolean) are ignored by
    validation."""
    add_input_image(settings)
    prompt = {"3": {"inputs": {"filename_prefix": "floats", "images": ["2", 0]}, "class_type": "SaveImage"},
              "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
              "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0], "note": 0.1 + 0.2, "tiny": 1e-07,
                                                            "whole": 2.0, "big": 123456789012.5,
                                                            "flag": True}}}
    digest = check_image_answer(client, run(client, prompt), prompt)
    assert digest != hashlib.sha256(json.dumps(prompt, separators=(",", ":"), sort_keys=True).encode()).hexdigest()
    last = call(client, "GET", "/api/v1/prompts").json()
    assert json.dumps(last) == json.dumps(prompt)  # the prompt as sent: same keys, order and floats


def test_digest_with_non_ascii_text(client, settings):
    add_input_image(settings)
    prompt = invert_prompt(prefix="café_東京")
    response = run(client, prompt)
    digest = check_image_answer(client, response, prompt)
    ascii_json = json.dumps(prompt, separators=(",", ":"))
    assert "\\u6771\\u4eac" in ascii_json and digest == spec_digest(ascii_json)  # ensure_ascii=True, as the spec
    assert disposition_filename(response.headers["Content-Disposition"]).startswith("café_東京")


def test_repeated_prompt_is_answered_from_the_store(client, settings):
    first = _ran(client, settings)
    runs = len(history(client))
    assert _ran(client, settings) == first and len(history(client)) == runs
    response = run(client, invert_prompt(), headers={"Cache-Control": "no-cache"})
    check_image_answer(client, response, invert_prompt())
    assert len(history(client)) == runs + 1


def test_prompt_without_save_image_is_204(client, settings):
    add_input_image(settings)
    response = run(client, preview_prompt())
    assert response.status_code == 204 and response.content == b""
    assert "Location" not in response.headers


@pytest.mark.parametrize("prompt", [
    {"1": {"class_type": "NoSuchNode", "inputs": {}}},
    invert_prompt(image="missing.png"),
    {"3": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "x"}}},
    {"1": {"class_type": "TestIntConst", "inputs": {"value": 1}}},  # no output node
    ["not", "a", "prompt"],
], ids=["unknown-class", "missing-file", "dangling-link", "no-output", "not-an-object"])
def test_invalid_prompt_is_400(client, prompt):
    response = run(client, prompt)
    assert response.status_code == 400
    assert response.json()["error"]["message"]


def test_failing_prompt_is_500_with_the_node_and_exception(client):
    prompt = {"1": {"class_type": "TestFail", "inputs": {"value": 7}},
              "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}
    response = run(client, prompt)
    assert response.status_code == 500
    error = response.json()["error"]
    assert (error["node_id"], error["class_type"]) == ("1", "TestFail")
    assert error["exception_type"].endswith("ValueError") and error["exception_message"] == "refusing 7"


def test_full_queue_is_429_with_retry_after(make_client, tmp_path):
    client = make_client(Settings(data_dir=tmp_path / "data", max_queue=1))
    running = queue_prompt(client, wait_prompt(1))
    wait_running(client, running)
    queue_prompt(client, wait_prompt(2))
    response = run(client, wait_prompt(3))
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) > 0


def test_get_prompts_is_404_until_a_prompt_ran_then_the_last_one(client, settings):
    assert call(client, "GET", "/api/v1/prompts").status_code == 404
    add_input_image(settings)
    _ran(client, settings)
    prompt_id = queue_prompt(client, invert_prompt(prefix="via-comfy-route"))
    wait_history(client, prompt_id)
    assert call(client, "GET", "/api/v1/prompts").json() == invert_prompt(prefix="via-comfy-route")


@pytest.mark.parametrize("digest", ["0" * 64, "e5187160a7b2c496773c1c5a45bfd3ffbf25eaa5969328e6469d36f31cf240a3",
                                    "not-a-digest", "..%2F..%2Fetc%2Fpasswd", "g" * 64])
def test_unknown_digest_is_404(client, digest):
    response = call(client, "GET", f"/api/v1/images/{digest}", "/api/v1/images/{digest}")
    assert response.status_code == 404
