"""Validation: ComfyUI's error types and shapes for each kind of bad prompt."""
from __future__ import annotations

import pytest

from engine.errors import InvalidPrompt
from engine.validation import validate_prompt


def const(value, node_class="TestIntConst"):
    return {"class_type": node_class, "inputs": {"value": value}}


def collect(link):
    return {"class_type": "TestCollect", "inputs": {"value": link}}


def invalid(prompt, registry) -> InvalidPrompt:
    with pytest.raises(InvalidPrompt) as caught:
        validate_prompt(prompt, registry)
    return caught.value


def node_error_types(exc: InvalidPrompt, node_id: str) -> list[str]:
    return [e["type"] for e in exc.node_errors[node_id]["errors"]]


@pytest.mark.parametrize("prompt, message", [
    ([1, 2], "must be a JSON object"),
    ({}, "empty"),
    ({"1": "x"}, "must be an object"),
    ({"1": {"inputs": {}}}, "missing the class_type"),
    ({"1": {"class_type": "NoSuchNode", "inputs": {}}}, "node NoSuchNode does not exist"),
    ({"1": {"class_type": "TestCollect", "inputs": 5}}, "inputs must be an object"),
])
def test_malformed_prompts_are_invalid_prompt(registry, prompt, message):
    exc = invalid(prompt, registry)
    assert exc.error["type"] == "invalid_prompt"
    assert message in exc.error["message"]


def test_no_outputs(registry):
    exc = invalid({"1": const(1)}, registry)
    assert exc.error == {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                         "extra_info": {}}


@pytest.mark.parametrize("inputs, kind", [
    ({}, "required_input_missing"),
    ({"value": ["1"]}, "bad_linked_input"),
    ({"value": ["1", "0"]}, "bad_linked_input"),
    ({"value": ["9", 0]}, "bad_linked_input"),
    ({"value": ["1", 3]}, "bad_linked_input"),
    ({"value": ["2", 0]}, "return_type_mismatch"),
])
def test_link_errors(registry, inputs, kind):
    prompt = {"1": const(1), "2": {"class_type": "TestChoice", "inputs": {"mode": "a", "ratio": 0.5,
                                                                          "flag": True, "text": ""}},
              "3": {"class_type": "TestCollect", "inputs": inputs}}
    exc = invalid(prompt, registry)
    assert exc.error["type"] == "prompt_outputs_failed_validation"
    assert node_error_types(exc, "3") == [kind]
    assert exc.node_errors["3"]["class_type"] == "TestCollect"
    assert exc.node_errors["3"]["dependent_outputs"] == ["3"]


@pytest.mark.parametrize("value, kind", [
    (101, "value_bigger_than_max"),
    (-101, "value_smaller_than_min"),
    ("abc", "invalid_input_type"),
    ({"a": 1}, "invalid_input_type"),
    (None, "invalid_input_type"),
])
def test_constant_errors_name_the_upstream_node(registry, value, kind):
    exc = invalid({"1": const(value), "2": collect(["1", 0])}, registry)
    assert node_error_types(exc, "1") == [kind]
    assert exc.node_errors["1"]["dependent_outputs"] == ["2"]
    assert "2" not in exc.node_errors  # downstream nodes are invalid too, but carry no errors of their own
    assert exc.node_errors["1"]["errors"][0]["extra_info"]["input_name"] == "value"


def choice(**inputs):
    base = {"mode": "a", "ratio": 0.5, "flag": False, "text": "t"}
    return {"class_type": "TestChoice", "inputs": {**base, **inputs}}


def test_combo_value_not_in_list(registry):
    prompt = {"1": choice(mode="c"), "2": {"class_type": "TestCollect", "inputs": {"value": 1, "label": ["1", 0]}}}
    exc = invalid(prompt, registry)
    assert node_error_types(exc, "1") == ["value_not_in_list"]
    assert "'c' not in ['a', 'b']" in exc.node_errors["1"]["errors"][0]["details"]


def test_constants_are_coerced_in_a_copy(registry):
    prompt = {"1": const("7"), "2": {"class_type": "TestCollect", "inputs": {"value": ["1", 0], "label": 5}}}
    validated = validate_prompt(prompt, registry)
    assert validated.prompt["1"]["inputs"]["value"] == 7
    assert validated.prompt["2"]["inputs"]["label"] == "5"
    assert prompt["1"]["inputs"]["value"] == "7"  # the request's prompt is left as sent (its digest)


@pytest.mark.parametrize("value, expected", [(True, True), ("false", False), (0, False)])
def test_boolean_coercion(registry, value, expected):
    prompt = {"1": choice(flag=value), "2": {"class_type": "TestCollect", "inputs": {"value": 1, "label": ["1", 0]}}}
    assert validate_prompt(prompt, registry).prompt["1"]["inputs"]["flag"] is expected


def test_non_finite_float_is_refused(registry):
    prompt = {"1": choice(ratio=float("nan")), "2": {"class_type": "TestCollect",
                                                     "inputs": {"value": 1, "label": ["1", 0]}}}
    exc = invalid(prompt, registry)
    assert node_error_types(exc, "1") == ["invalid_input_type"]


def test_cycle_is_a_validation_error(registry):
    prompt = {
        "1": {"class_type": "TestAdd", "inputs": {"a": ["2", 0], "b": 1}},
        "2": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": 1}},
        "3": collect(["1", 0]),
    }
    exc = invalid(prompt, registry)
    errors = [e for entry in exc.node_errors.values() for e in entry["errors"]]
    assert [e["type"] for e in errors] == ["dependency_cycle"]
    assert "1 -> 2 -> 1" in errors[0]["details"]


def test_self_loop_is_a_cycle(registry):
    prompt = {"1": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": 1}}, "2": collect(["1", 0])}
    assert node_error_types(invalid(prompt, registry), "1") == ["dependency_cycle"]


def test_valid_outputs_survive_beside_invalid_ones(registry):
    prompt = {"1": const(1), "2": collect(["1", 0]), "3": collect(["9", 0])}
    validated = validate_prompt(prompt, registry)
    assert validated.outputs == ["2"]
    assert list(validated.node_errors) == ["3"]


def test_link_with_integer_node_id_is_accepted(registry):
    prompt = {"1": const(1), "2": collect([1, 0])}
    assert validate_prompt(prompt, registry).outputs == ["2"]


def test_custom_validation_failure(registry, settings):
    from engine.context import NodeContext
    from engine.folders import Folders

    folders = Folders(settings.input_dir, settings.output_dir, settings.temp_dir)
    folders.ensure()
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
    with pytest.raises(InvalidPrompt) as caught:
        validate_prompt(prompt, registry, NodeContext(folders))
    error = caught.value.node_errors["1"]["errors"][0]
    assert error["type"] == "custom_validation_failed"
    assert "missing.png" in error["details"]
