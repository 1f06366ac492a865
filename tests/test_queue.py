"""Queue semantics over HTTP: numbering, front, delete, clear, admission control (429) and interrupt."""
from __future__ import annotations

import threading
import time

import pytest

from engine.settings import Settings
from tests import graph_nodes


def wait_prompt(value=0):
    return {"1": {"class_type": "TestWait", "inputs": {"value": value}},
            "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}


def quick_prompt(value):
    return {"1": {"class_type": "TestIntConst", "inputs": {"value": value}},
            "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}


def until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def queue_prompt(client, prompt, **fields):
    r = client.post("/prompt", json={"prompt": prompt, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def block_executor(client):
    """Queue a prompt that holds the executor until RELEASE is set; return its id once it runs."""
    prompt_id = queue_prompt(client, wait_prompt())["prompt_id"]
    until(lambda: client.get("/queue").json()["queue_running"])
    return prompt_id


def history_ids(client):
    return list(client.get("/history").json())


def test_numbers_increase_and_front_jumps_the_line(client):
    blocker = block_executor(client)
    a = queue_prompt(client, quick_prompt(1))
    b = queue_prompt(client, quick_prompt(2), front=True)
    assert a["number"] == 1 and b["number"] == -2
    pending = client.get("/queue").json()["queue_pending"]
    assert [item[1] for item in pending] == [b["prompt_id"], a["prompt_id"]]
    graph_nodes.RELEASE.set()
    until(lambda: len(history_ids(client)) == 3)
    assert history_ids(client) == [blocker, b["prompt_id"], a["prompt_id"]]


def test_delete_and_clear_pending(client):
    block_executor(client)
    ids = [queue_prompt(client, quick_prompt(i))["prompt_id"] for i in range(3)]
    assert client.post("/queue", json={"delete": [ids[1]]}).status_code == 200
    assert [item[1] for item in client.get("/queue").json()["queue_pending"]] == [ids[0], ids[2]]
    assert client.post("/queue", json={"clear": True}).status_code == 200
    assert client.get("/queue").json()["queue_pending"] == []
    graph_nodes.RELEASE.set()
    until(lambda: client.get("/prompt").json()["exec_info"]["queue_remaining"] == 0)
    assert not set(ids) & set(history_ids(client))


def test_full_queue_answers_429_and_loses_nothing(make_client, tmp_path):
    client = make_client(Settings(data_dir=tmp_path / "data", max_queue=2, retry_after_s=7))
    accepted = [block_executor(client)]
    accepted += [queue_prompt(client, quick_prompt(i))["prompt_id"] for i in range(2)]
    refused = client.post("/prompt", json={"prompt": quick_prompt(9)})
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "7"
    assert "limit is 2" in refused.json()["error"]["message"]
    api = client.post("/api/v1/prompts", json=quick_prompt(10))
    assert api.status_code == 429
    assert client.get("/readyz").status_code == 503
    assert client.get("/readyz").json()["status"] == "queue_full"
    graph_nodes.RELEASE.set()
    until(lambda: len(history_ids(client)) == 3)
    assert sorted(history_ids(client)) == sorted(accepted)
    assert all(entry["status"]["status_str"] == "success" for entry in client.get("/history").json().values())
    assert client.get("/readyz").status_code == 200


def test_interrupt_stops_the_running_prompt(client):
    answers = []
    worker = threading.Thread(target=lambda: answers.append(client.post("/api/v1/prompts", json=wait_prompt())))
    worker.start()
    until(lambda: client.get("/queue").json()["queue_running"])
    assert client.post("/interrupt").status_code == 200
    worker.join(10)
    response = answers[0]
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "execution_interrupted"
    (entry,) = client.get("/history").json().values()
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"


def test_interrupt_of_another_prompt_id_leaves_the_running_one(client):
    block_executor(client)
    client.post("/interrupt", json={"prompt_id": "not-this-one"})
    time.sleep(0.1)
    assert client.get("/queue").json()["queue_running"]
    graph_nodes.RELEASE.set()
    until(lambda: client.get("/prompt").json()["exec_info"]["queue_remaining"] == 0)
    (entry,) = client.get("/history").json().values()
    assert entry["status"]["status_str"] == "success"


def test_history_paging_and_delete(client):
    ids = [queue_prompt(client, quick_prompt(i))["prompt_id"] for i in range(4)]
    until(lambda: len(history_ids(client)) == 4)
    assert list(client.get("/history", params={"max_items": 2}).json()) == ids[2:]
    assert list(client.get(f"/history/{ids[0]}").json()) == [ids[0]]
    assert client.get("/history/unknown").json() == {}
    client.post("/history", json={"delete": [ids[0]]})
    assert history_ids(client) == ids[1:]
    client.post("/history", json={"clear": True})
    assert history_ids(client) == []


def test_history_is_bounded(make_client, tmp_path):
    client = make_client(Settings(data_dir=tmp_path / "data", history_size=2))
    ids = [queue_prompt(client, quick_prompt(i))["prompt_id"] for i in range(4)]
    until(lambda: client.get("/prompt").json()["exec_info"]["queue_remaining"] == 0)
    assert history_ids(client) == ids[2:]


@pytest.mark.parametrize("body", [{"delete": "abc"}, [1, 2]])
def test_bad_queue_bodies_are_400(client, body):
    assert client.post("/queue", json=body).status_code == 400
