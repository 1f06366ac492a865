"""Prompt validation with ComfyUI's error types and shapes.

The prompt is checked in three layers: its shape (`invalid_prompt`), its outputs (`prompt_no_outputs`), then each
output's inputs, recursively through links (`prompt_outputs_failed_validation` with per-node errors). Constants are
coerced to their declared type in a copy of the prompt, which is what then runs.
"""
from __future__ import annotations

import logging
import math
import traceback
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidPrompt, full_type_name
from engine.graph import Prompt, as_link
from engine.registry import CONTEXT_TYPE, NodeRegistry, accepted_names, call_with_accepted, input_types

log = logging.getLogger(__name__)


@dataclass
class Validated:
    prompt: Prompt  # the prompt with constants coerced to their declared types
    outputs: list[str]  # output nodes that passed validation
    node_errors: dict[str, Any]  # ComfyUI's per-node errors of the outputs that failed


def problem(kind: str, message: str, details: str = "", **extra_info: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


def validate_prompt(prompt: Any, registry: NodeRegistry, context: Any = None) -> Validated:
    """Raise `InvalidPrompt` when no output can run; else return what can, with the errors of the rest."""
    check_shape(prompt, registry)
    prompt = {nid: {**node, "inputs": dict(node.get("inputs", {}))} for nid, node in prompt.items()}  # to coerce
    outputs = [nid for nid, node in prompt.items() if getattr(registry.get(node["class_type"]), "OUTPUT_NODE", False)]
    if not outputs:
        raise InvalidPrompt(problem("prompt_no_outputs", "Prompt has no outputs"))
    checker = _NodeChecker(prompt, registry, context)
    good, node_errors, reasons = [], {}, []
    for output in outputs:
        if checker.check(output):
            good.append(output)
            continue
        for node_id, errors in checker.errors.items():
            if errors:
                entry = node_errors.setdefault(
                    node_id, {"errors": errors, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]}
                )
                if output not in entry["dependent_outputs"]:
                    entry["dependent_outputs"].append(output)
                reasons += [f"{e['message']}: {e['details']}" for e in errors]
    if not good:
        details = "\n".join(dict.fromkeys(reasons))
        raise InvalidPrompt(
            problem("prompt_outputs_failed_validation", "Prompt outputs failed validation", details), node_errors
        )
    return Validated(prompt, good, node_errors)


def check_shape(prompt: Any, registry: NodeRegistry) -> None:
    if not isinstance(prompt, dict):
        raise InvalidPrompt(problem("invalid_prompt", "The prompt must be a JSON object of node id -> node",
                                    f"got {type(prompt).__name__}"))
    if not prompt:
        raise InvalidPrompt(problem("invalid_prompt", "The prompt is empty", "it has no nodes"))
    for node_id, node in prompt.items():
        where = f"Node ID '#{node_id}'"
        if not isinstance(node, dict):
            raise InvalidPrompt(problem("invalid_prompt", "Each node must be an object with class_type and inputs",
                                        where))
        class_type = node.get("class_type")
        if not isinstance(class_type, str):
            raise InvalidPrompt(problem(
                "invalid_prompt", "Cannot execute because a node is missing the class_type property.", where))
        if class_type not in registry:
            raise InvalidPrompt(problem(
                "invalid_prompt", f"Cannot execute because node {class_type} does not exist.", where))
        if not isinstance(node.get("inputs", {}), dict):
            raise InvalidPrompt(problem("invalid_prompt", "A node's inputs must be an object", where))


class _NodeChecker:
    """Checks nodes depth-first through their links, once each; `errors[node_id]` lists its own problems."""

    def __init__(self, prompt: Prompt, registry: NodeRegistry, context: Any):
        self.prompt = prompt
        self.registry = registry
        self.context = context
        self.valid: dict[str, bool] = {}
        self.errors: dict[str, list[dict[str, Any]]] = {}
        self.visiting: list[str] = []

    def check(self, node_id: str) -> bool:
        if node_id in self.valid:
            return self.valid[node_id]
        self.visiting.append(node_id)
        try:
            ok, errors = self._check_inputs(node_id)
        except Exception as exc:  # a node's own INPUT_TYPES or VALIDATE_INPUTS raised
            ok, errors = False, [problem("exception_during_validation", "Exception when validating node", str(exc),
                                         exception_type=full_type_name(type(exc)),
                                         traceback=traceback.format_tb(exc.__traceback__))]
        finally:
            self.visiting.pop()
        self.valid[node_id], self.errors[node_id] = ok and not errors, errors
        return self.valid[node_id]

    def _check_inputs(self, node_id: str) -> tuple[bool, list[dict[str, Any]]]:
        node = self.prompt[node_id]
        cls = self.registry.get(node["class_type"])
        spec = input_types(cls)
        inputs = node["inputs"]
        custom = getattr(cls, "VALIDATE_INPUTS", None)
        custom_names = accepted_names(custom) if custom else set()
        errors: list[dict[str, Any]] = []
        upstream_ok = True
        for section in ("required", "optional"):
            for name, config in spec.get(section, {}).items():
                if name not in inputs:
                    if section == "required":
                        errors.append(problem("required_input_missing", "Required input is missing", name,
                                              input_name=name))
                    continue
                if isinstance(inputs[name], list):
                    error, linked_ok = self._check_link(name, config, inputs[name])
                    upstream_ok &= linked_ok
                else:
                    skip_value_checks = custom_names is None or name in custom_names
                    error = _check_constant(inputs, name, config, skip_value_checks)
                if error:
                    errors.append(error)
        if custom and not errors:
            errors += self._custom_validation(cls, custom, spec, inputs)
        return upstream_ok, errors

    def _check_link(self, name: str, config: list, value: list) -> tuple[dict | None, bool]:
        link = as_link(value)
        if link is None:
            return problem("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                           name, input_name=name, input_config=config, received_value=value), True
        source, index = link
        if source not in self.prompt:
            return problem("bad_linked_input", "Linked node does not exist", f"{name}: node {source} is not in the "
                           "prompt", input_name=name, input_config=config, linked_node=value), True
        if source in self.visiting:
            cycle = self.visiting[self.visiting.index(source):] + [source]
            return problem("dependency_cycle", "Dependency cycle detected",
                           f"{name}: {' -> '.join(cycle)}", input_name=name, linked_node=value), True
        returns = self.registry.get(self.prompt[source]["class_type"]).RETURN_TYPES
        if index >= len(returns):
            return problem("bad_linked_input", "Linked output index is out of range",
                           f"{name}: node {source} has {len(returns)} outputs, index {index} asked",
                           input_name=name, input_config=config, linked_node=value), True
        received, expected = returns[index], _type_name(config[0])
        if not types_match(received, expected):
            return problem("return_type_mismatch", "Return type mismatch between linked nodes",
                           f"{name}, received_type({received}) mismatch input_type({expected})", input_name=name,
                           input_config=config, received_type=received, linked_node=value), True
        return None, self.check(source)

    def _custom_validation(self, cls: type, custom: Any, spec: dict, inputs: dict) -> list[dict[str, Any]]:
        kwargs = {k: v for k, v in inputs.items() if not isinstance(v, list)}
        for name, kind in spec.get("hidden", {}).items():
            if kind == CONTEXT_TYPE:
                kwargs[name] = self.context
        result = call_with_accepted(custom, kwargs)
        if result is True:
            return []
        details = "" if result is False else str(result)
        return [problem("custom_validation_failed", "Custom validation failed for node", details)]


def _type_name(declared: Any) -> str:
    return "COMBO" if isinstance(declared, (list, tuple)) else str(declared)


def types_match(received: str, expected: str) -> bool:
    """ComfyUI's rule: equal, either is `*`, or the comma-separated unions share a type."""
    if received == expected or "*" in (received, expected):
        return True
    return bool(set(received.split(",")) & set(expected.split(",")))


def _check_constant(inputs: dict, name: str, config: list, skip_value_checks: bool) -> dict | None:
    declared = config[0]
    options = config[1] if len(config) > 1 and isinstance(config[1], dict) else {}
    value = inputs[name]
    convert = _CONVERTERS.get(declared) if isinstance(declared, str) else None
    if convert is not None:
        try:
            value = inputs[name] = convert(value)
        except (TypeError, ValueError, OverflowError) as exc:
            return problem("invalid_input_type", f"Failed to convert an input value to a {declared} value",
                           f"{name}, {value}, {exc}", input_name=name, input_config=config, received_value=value,
                           exception_message=str(exc))
    if skip_value_checks:  # the node's VALIDATE_INPUTS judges this input itself
        return None
    if isinstance(declared, (list, tuple)):
        if value in declared:
            return None
        shown = f"(list of length {len(declared)})" if len(declared) > 20 else str(list(declared))
        return problem("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {shown}",
                       input_name=name, input_config=config if len(declared) <= 20 else None, received_value=value)
    if "min" in options and value < options["min"]:
        return problem("value_smaller_than_min", f"Value {value} smaller than min of {options['min']}", name,
                       input_name=name, input_config=config, received_value=value)
    if "max" in options and value > options["max"]:
        return problem("value_bigger_than_max", f"Value {value} bigger than max of {options['max']}", name,
                       input_name=name, input_config=config, received_value=value)
    return None


def _to_int(value: Any) -> int:
    if isinstance(value, str):
        value = value.strip()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, (dict, list)) or value is None:
        raise TypeError(f"expected a number, got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{value} is not a finite number")
    return result


def _to_string(value: Any) -> str:
    if isinstance(value, (dict, list)) or value is None:
        raise TypeError(f"expected text, got {type(value).__name__}")
    return str(value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"expected true or false, got {value!r}")


_CONVERTERS = {"INT": _to_int, "FLOAT": _to_float, "STRING": _to_string, "BOOLEAN": _to_bool}
