"""Execution semantics: what runs, in which order, what is reused from the cache, list mapping, failures and
interrupts, with the events ComfyUI sends for each."""
from __future__ import annotations

import threading

import pytest

from engine.cache import OutputCache
from engine.context import NodeContext
from engine.errors import ExecutionFailed, ExecutionInterrupted
from engine.execution import run_prompt
from engine.folders import Folders
from engine.validation import validate_prompt
from tests.graph_nodes import CALLS


class Runner:
    """Validates and runs prompts against one cache, recording the events."""

    def __init__(self, registry, settings):
        self.registry = registry
        self.cache = OutputCache(64)
        self.folders = Folders(settings.input_dir, settings.output_dir, settings.temp_dir)
        self.folders.ensure()
        self.events: list[tuple[str, dict]] = []

    def __call__(self, prompt, context=None):
        self.events.clear()
        validated = validate_prompt(prompt, self.registry)
        context = context or NodeContext(self.folders, prompt_id="p1")
        return run_prompt(validated.prompt, validated.outputs, self.registry, self.cache, context,
                          lambda event, data: self.events.append((event, data)))

    def names(self) -> list[str]:
        return [event for event, _ in self.events]

    def executing(self) -> list[str | None]:
        return [data["node"] for event, data in self.events if event == "executing"]


@pytest.fixture
def run(registry, settings) -> Runner:
    return Runner(registry, settings)


def chain(a=1, b=2):
    return {
        "1": {"class_type": "TestIntConst", "inputs": {"value": a}},
        "2": {"class_type": "TestIntConst", "inputs": {"value": b}},
        "3": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "TestCollect", "inputs": {"value": ["3", 0]}},
        "9": {"class_type": "TestIntConst", "inputs": {"value": 50}},  # feeds no output: never runs
    }


def test_runs_only_what_outputs_need_in_dependency_order(run):
    result = run(chain())
    assert result.outputs == {"4": {"values": [3]}}
    assert result.executed == ["1", "2", "3", "4"]
    assert CALLS["IntConst"] == 2


def test_event_sequence(run):
    run(chain())
    assert run.names() == ["execution_start", "execution_cached", "executing", "executing", "executing",
                           "executing", "executed", "executing", "execution_success"]
    assert run.executing() == ["1", "2", "3", "4", None]
    executed = dict(run.events)["executed"]
    assert executed == {"node": "4", "display_node": "4", "output": {"values": [3]}, "prompt_id": "p1"}


def test_identical_prompt_is_fully_cached(run):
    run(chain())
    result = run(chain())
    assert result.executed == []
    assert sorted(result.cached) == ["1", "2", "3", "4"]
    assert result.outputs == {"4": {"values": [3]}}  # cached UI output is still reported
    assert run.executing() == [None]  # cached nodes send no executing message
    assert dict(run.events)["execution_cached"]["nodes"] == result.cached


def test_changing_one_constant_reruns_only_it_and_what_follows(run):
    run(chain(a=1))
    result = run(chain(a=5))
    assert result.executed == ["1", "3", "4"]
    assert result.cached == ["2"]
    assert result.outputs["4"] == {"values": [7]}


def test_is_changed_nan_always_reruns(run):
    prompt = {"1": {"class_type": "TestVolatile", "inputs": {"value": 4}},
              "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}
    run(prompt)
    result = run(prompt)
    assert result.executed == ["1", "2"]
    assert CALLS["Volatile"] == 2


def test_output_is_list_maps_downstream_nodes_per_element(run):
    prompt = {
        "1": {"class_type": "TestRange", "inputs": {"count": 3}},
        "2": {"class_type": "TestIntConst", "inputs": {"value": 10}},
        "3": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "TestCollect", "inputs": {"value": ["3", 0]}},
        "5": {"class_type": "TestSum", "inputs": {"values": ["3", 0]}},
        "6": {"class_type": "TestCollect", "inputs": {"value": ["5", 0]}},
    }
    result = run(prompt)
    assert CALLS["Add"] == 3  # once per element of the longest input list, the shorter one repeated
    assert result.outputs["4"] == {"values": [10, 11, 12]}
    assert CALLS["Sum"] == 1  # INPUT_IS_LIST: called once with the whole list
    assert result.outputs["6"] == {"values": [33]}


def test_empty_list_input_calls_nothing(run):
    prompt = {"1": {"class_type": "TestRange", "inputs": {"count": 0}},
              "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}
    result = run(prompt)
    assert CALLS["Collect"] == 0
    assert "2" not in result.outputs


def test_failure_names_the_node_and_emits_execution_error(run):
    prompt = {"1": {"class_type": "TestIntConst", "inputs": {"value": 1}},
              "2": {"class_type": "TestFail", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "TestCollect", "inputs": {"value": ["2", 0]}}}
    with pytest.raises(ExecutionFailed) as caught:
        run(prompt)
    exc = caught.value
    assert (exc.node_id, exc.class_type, exc.exception_type) == ("2", "TestFail", "ValueError")
    assert str(exc.cause) == "refusing 1"
    event, data = run.events[-1]
    assert event == "execution_error"
    assert data["node_id"] == "2" and data["node_type"] == "TestFail" and data["executed"] == ["1"]
    assert data["exception_message"] == "refusing 1" and data["traceback"]


def test_failed_node_is_not_cached(run):
    prompt = {"1": {"class_type": "TestIntConst", "inputs": {"value": 1}},
              "2": {"class_type": "TestFail", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "TestCollect", "inputs": {"value": ["2", 0]}}}
    for _ in range(2):
        with pytest.raises(ExecutionFailed):
            run(prompt)
    assert run.events[-1][0] == "execution_error"


def test_progress_events_carry_the_node(run):
    prompt = {"1": {"class_type": "TestSlow", "inputs": {"value": 1, "steps": 3, "delay": 0.0}},
              "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}
    run(prompt)
    progress = [data for event, data in run.events if event == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(1, 3, "1"), (2, 3, "1"), (3, 3, "1")]


def test_interrupt_inside_a_long_node(run):
    context = NodeContext(run.folders, prompt_id="p1")
    prompt = {"1": {"class_type": "TestSlow", "inputs": {"value": 1, "steps": 200, "delay": 0.01}},
              "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0]}}}
    timer = threading.Timer(0.1, context.interrupt_event.set)
    timer.start()
    with pytest.raises(ExecutionInterrupted) as caught:
        run(prompt, context)
    assert caught.value.node_id == "1"
    event, data = run.events[-1]
    assert event == "execution_interrupted" and data["node_id"] == "1" and data["node_type"] == "TestSlow"
    assert len([e for e, _ in run.events if e == "progress"]) < 200


def test_interrupt_between_nodes(run):
    context = NodeContext(run.folders, prompt_id="p1")
    context.interrupt_event.set()
    with pytest.raises(ExecutionInterrupted):
        run(chain(), context)
    assert CALLS["IntConst"] == 0
