"""POST /api/v1/prompts and its companions: bodies, answers, the digest store, errors."""
from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from engine.settings import Settings
from handler.body import prompt_digest
from tests.conftest import add_input_image, invert_prompt, png_bytes

PNG = {"Accept": "image/png"}


def pixels(data: bytes):
    return Image.open(io.BytesIO(data)).convert("RGBA").getpixel((0, 0))


def inverted(rgb) -> tuple[int, ...]:
    """ImageInvert then SaveImage in float32, truncating as ComfyUI does (200 -> 54, not 55)."""
    values = 255.0 * (1.0 - np.asarray(rgb, dtype=np.float32) / np.float32(255.0))
    return tuple(int(v) for v in np.clip(values, 0, 255).astype(np.uint8))


def history_len(client) -> int:
    return len(client.get("/history").json())


@pytest.fixture
def image_ready(settings):
    add_input_image(settings, color=(200, 100, 50, 255))


def test_answers_with_urls_and_headers(client, image_ready):
    prompt = invert_prompt(prefix="api")
    r = client.post("/api/v1/prompts", json=prompt)
    assert r.status_code == 200, r.text
    digest = prompt_digest(prompt)
    assert r.headers["Location"] == f"/api/v1/images/{digest}"
    assert r.headers["Digest"] == f"SHA256={digest}"
    assert r.headers["Content-Disposition"] == "filename=api_00001_.png"
    digest_url, view_url = r.json()["urls"]
    assert digest_url == r.headers["Location"]
    assert view_url == "http://testserver/view?filename=api_00001_.png&type=output"
    stored = client.get(digest_url)
    viewed = client.get(view_url)
    assert stored.headers["content-type"] == "image/png"
    assert stored.content == viewed.content
    assert pixels(stored.content) == (*inverted((200, 100, 50)), 255)


def test_accept_png_returns_the_bytes(client, image_ready):
    r = client.post("/api/v1/prompts", json=invert_prompt(), headers=PNG)
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.content == client.get(r.headers["Location"]).content
    assert r.headers["Content-Disposition"] == "filename=ComfyUI_00001_.png"


@pytest.mark.parametrize("accept, png", [
    ("image/png", True), ("image/*", True), ("application/json", False), ("*/*", False), ("", False),
    ("application/json;q=0.5, image/png", True), ("image/png;q=0.2, application/json", False),
])
def test_content_negotiation(accept, png):
    from handler.prompts import wants_png
    assert wants_png(accept) is png


def test_envelope_and_bare_prompt_share_the_digest(client, image_ready):
    prompt = invert_prompt()
    bare = client.post("/api/v1/prompts", json=prompt)
    wrapped = client.post("/api/v1/prompts", json={"prompt": prompt, "client_id": "c1"})
    assert bare.headers["Digest"] == wrapped.headers["Digest"]


def test_known_digest_is_answered_from_the_store(client, image_ready):
    prompt = invert_prompt()
    first = client.post("/api/v1/prompts", json=prompt, headers=PNG)
    runs = history_len(client)
    again = client.post("/api/v1/prompts", json=prompt, headers=PNG)
    assert again.content == first.content
    assert history_len(client) == runs  # nothing ran
    fresh = client.post("/api/v1/prompts", json=prompt, headers={**PNG, "Cache-Control": "no-cache"})
    assert fresh.status_code == 200
    assert history_len(client) == runs + 1


def test_no_save_image_is_204(client, image_ready):
    prompt = invert_prompt()
    prompt["3"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    r = client.post("/api/v1/prompts", json=prompt)
    assert r.status_code == 204
    assert r.content == b""


def test_primary_image_is_the_last_image_of_the_last_save_image(client, settings):
    add_input_image(settings, "a.png", color=(0, 0, 0, 255))
    add_input_image(settings, "b.png", color=(255, 255, 255, 255))
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "b.png"}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "last"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "first"}},
    }
    order = {k: prompt[k] for k in ("1", "2", "3", "5", "4")}  # "4" comes last in the prompt as sent
    r = client.post("/api/v1/prompts", json=order, headers=PNG)
    assert r.headers["Content-Disposition"] == "filename=last_00002_.png"
    assert pixels(r.content) == (255, 255, 255, 255)


def test_last_prompt(client, image_ready):
    assert client.get("/api/v1/prompts").status_code == 404
    prompt = invert_prompt(prefix="remember")
    client.post("/api/v1/prompts", json={"prompt": prompt})
    r = client.get("/api/v1/prompts")
    assert r.status_code == 200
    assert r.json() == prompt
    assert list(r.json()) == list(prompt)  # key order as sent, so it can be POSTed again for the same digest


def test_last_prompt_covers_the_ui_route(client):
    prompt = {"1": {"class_type": "TestIntConst", "inputs": {"value": 3}},
              "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}
    client.post("/prompt", json={"prompt": prompt})
    client.post("/queue", json={})  # any request; the executor finishes the prompt meanwhile
    import time
    deadline = time.monotonic() + 5
    while client.get("/api/v1/prompts").status_code == 404 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.get("/api/v1/prompts").json() == prompt


@pytest.mark.parametrize("path", ["/api/v1/images/abc", "/api/v1/images/..%2F..%2Fetc%2Fpasswd",
                                  "/api/v1/images/" + "g" * 64, "/api/v1/images/" + "0" * 64])
def test_image_lookup_rejects_non_digests_and_unknown_ones(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert "error" in r.json()


@pytest.mark.parametrize("body, headers, fragment", [
    (b"{not json", {"Content-Type": "application/json"}, "not valid JSON"),
    (b"", {"Content-Type": "application/json"}, "empty"),
    (b"<xml/>", {"Content-Type": "application/xml"}, "Content-Type 'application/xml' is not accepted"),
    (b"[1, 2]", {"Content-Type": "application/json"}, "must be a JSON object"),
    (b'"text"', {"Content-Type": "application/json"}, "must be a JSON object"),
])
def test_malformed_bodies_are_400_with_a_message(client, body, headers, fragment):
    r = client.post("/api/v1/prompts", content=body, headers=headers)
    assert r.status_code == 400
    assert fragment in json.dumps(r.json())


def test_invalid_prompt_is_400_with_comfyui_errors(client):
    prompt = {"1": {"class_type": "TestIntConst", "inputs": {"value": 1000}},
              "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}
    r = client.post("/api/v1/prompts", json=prompt)
    assert r.status_code == 400
    body = r.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["1"]["errors"][0]["type"] == "value_bigger_than_max"


def test_partly_invalid_prompt_is_refused_whole(client):
    prompt = {"1": {"class_type": "TestIntConst", "inputs": {"value": 1}},
              "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "TestCollect", "inputs": {"value": ["8", 0]}}}
    r = client.post("/api/v1/prompts", json=prompt)
    assert r.status_code == 400
    assert list(r.json()["node_errors"]) == ["3"]
    assert history_len(client) == 0


def test_execution_error_is_500_naming_the_node(client):
    prompt = {"1": {"class_type": "TestFail", "inputs": {"value": 4}},
              "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}
    r = client.post("/api/v1/prompts", json=prompt)
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["node_id"] == "1"
    assert error["class_type"] == "TestFail"
    assert error["exception_type"] == "ValueError"
    assert error["exception_message"] == "refusing 4"
    assert client.get("/healthz").status_code == 200  # and the server keeps serving


def test_missing_input_file_is_a_validation_error(client):
    r = client.post("/api/v1/prompts", json=invert_prompt(image="nowhere.png"))
    assert r.status_code == 400
    assert r.json()["node_errors"]["1"]["errors"][0]["type"] == "custom_validation_failed"


def test_multipart_with_prompt_part_and_files(client, settings):
    prompt = invert_prompt(image="up.png", prefix="multi")
    files = [("prompt", (None, json.dumps(prompt), "application/json")),
             ("files", ("up.png", png_bytes(color=(0, 0, 0, 255)), "image/png"))]
    r = client.post("/api/v1/prompts", files=files, headers=PNG)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert pixels(r.content) == (255, 255, 255, 255)
    assert (settings.input_dir / "up.png").is_file()
    assert not any((settings.temp_dir / "requests").iterdir())  # the request's scratch folder is gone


def test_multipart_prompt_as_file_part(client):
    prompt = invert_prompt(image="f.png")
    files = [("prompt", ("prompt.json", json.dumps({"prompt": prompt}), "application/json")),
             ("image", ("f.png", png_bytes(), "image/png"))]
    assert client.post("/api/v1/prompts", files=files).status_code == 200


def test_multipart_without_prompt_part(client):
    r = client.post("/api/v1/prompts", files=[("files", ("a.png", png_bytes(), "image/png"))])
    assert r.status_code == 400
    assert "no part named 'prompt'" in r.json()["error"]["message"]


def test_multipart_file_name_with_a_path_is_refused(client):
    files = [("prompt", (None, json.dumps(invert_prompt(image="x.png")), "application/json")),
             ("files", ("../x.png", png_bytes(), "image/png"))]
    r = client.post("/api/v1/prompts", files=files)
    assert r.status_code in (400, 403)
    assert "error" in r.json()


def test_concurrent_requests_with_the_same_file_name_see_their_own_file(client):
    results = {}

    def post(shade):
        files = [("prompt", (None, json.dumps(invert_prompt(image="same.png", prefix=f"c{shade}")), "text/plain")),
                 ("files", ("same.png", png_bytes(color=(shade, shade, shade, 255)), "image/png"))]
        results[shade] = client.post("/api/v1/prompts", files=files, headers=PNG)

    threads = [threading.Thread(target=post, args=(shade,)) for shade in (10, 20, 30, 40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for shade, response in results.items():
        assert response.status_code == 200
        assert pixels(response.content)[:3] == inverted((shade,) * 3)


def test_oversized_body_is_413(make_client, tmp_path):
    client = make_client(Settings(data_dir=tmp_path / "data", max_body_bytes=1000))
    big = {"prompt": {"1": {"class_type": "TestIntConst", "inputs": {"value": 1, "pad": "x" * 2000}}}}
    r = client.post("/api/v1/prompts", json=big)
    assert r.status_code == 413
    assert "exceeds the limit of 1000 bytes" in r.json()["error"]["message"]

    def chunks():
        for _ in range(4):
            yield b"x" * 400

    streamed = client.post("/prompt", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert client.get("/healthz").status_code == 200


def test_routes_are_also_served_under_api(client, image_ready):
    assert client.get("/api/queue").json() == client.get("/queue").json()
    assert client.get("/api/object_info/SaveImage").json() == client.get("/object_info/SaveImage").json()
    r = client.post("/api/prompt", json={"prompt": invert_prompt()})
    assert r.status_code == 200 and r.json()["node_errors"] == {}
