"""/ws: ComfyUI's message sequence for a client's prompts, and cache reuse visible in the events."""
from __future__ import annotations

from tests.conftest import add_input_image, invert_prompt


def messages_until_done(ws, prompt_id):
    """Messages up to this prompt's execution_success / error / interrupted, status messages left out."""
    seen = []
    while True:
        message = ws.receive_json()
        if message["type"] == "status":
            continue
        assert message["data"].get("prompt_id") == prompt_id
        seen.append(message)
        if message["type"] in ("execution_success", "execution_error", "execution_interrupted"):
            return seen


def run(client, ws, prompt):
    r = client.post("/prompt", json={"prompt": prompt, "client_id": "me"})
    assert r.status_code == 200
    prompt_id = r.json()["prompt_id"]
    return prompt_id, messages_until_done(ws, prompt_id)


def test_first_message_is_status_with_the_session_id(client):
    with client.websocket_connect("/ws?clientId=abc") as ws:
        first = ws.receive_json()
    assert first == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "abc"}}


def test_message_sequence_and_cache_reuse(client, settings):
    add_input_image(settings)
    with client.websocket_connect("/ws?clientId=me") as ws:
        ws.receive_json()
        prompt_id, first = run(client, ws, invert_prompt())
        assert [m["type"] for m in first] == ["execution_start", "execution_cached", "executing", "executing",
                                             "executing", "executed", "executing", "execution_success"]
        assert [m["data"]["node"] for m in first if m["type"] == "executing"] == ["1", "2", "3", None]
        executed = next(m for m in first if m["type"] == "executed")["data"]
        assert executed["node"] == "3"
        assert executed["output"]["images"][0]["filename"] == "ComfyUI_00001_.png"

        changed = invert_prompt(prefix="other")  # only SaveImage's input differs
        _, second = run(client, ws, changed)
        cached = next(m for m in second if m["type"] == "execution_cached")["data"]["nodes"]
        assert sorted(cached) == ["1", "2"]
        assert [m["data"]["node"] for m in second if m["type"] == "executing"] == ["3", None]


def test_progress_messages(client):
    prompt = {"1": {"class_type": "TestSlow", "inputs": {"value": 1, "steps": 2, "delay": 0.0}},
              "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}
    with client.websocket_connect("/ws?clientId=me") as ws:
        ws.receive_json()
        prompt_id, messages = run(client, ws, prompt)
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert progress == [{"value": 1, "max": 2, "prompt_id": prompt_id, "node": "1"},
                        {"value": 2, "max": 2, "prompt_id": prompt_id, "node": "1"}]


def test_execution_error_message(client):
    prompt = {"1": {"class_type": "TestFail", "inputs": {"value": 2}},
              "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}
    with client.websocket_connect("/ws?clientId=me") as ws:
        ws.receive_json()
        _, messages = run(client, ws, prompt)
    error = messages[-1]["data"]
    assert messages[-1]["type"] == "execution_error"
    assert (error["node_id"], error["node_type"], error["exception_type"]) == ("1", "TestFail", "ValueError")


def test_other_clients_do_not_get_my_messages(client):
    prompt = {"1": {"class_type": "TestIntConst", "inputs": {"value": 1}},
              "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}
    with client.websocket_connect("/ws?clientId=other") as other, client.websocket_connect("/ws?clientId=me") as ws:
        other.receive_json()
        ws.receive_json()
        run(client, ws, prompt)
        # then one prompt of the other client's own: everything it receives but status is about that prompt
        own = client.post("/prompt", json={"prompt": prompt, "client_id": "other"}).json()["prompt_id"]
        received = []
        while not received or received[-1]["type"] != "execution_success":
            message = other.receive_json()
            if message["type"] != "status":
                received.append(message)
    assert {m["data"]["prompt_id"] for m in received} == {own}
