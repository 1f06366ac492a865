"""Running one validated prompt: the nodes its outputs need, in dependency order, reusing cached outputs.

Every node output is a list of values per output slot, which is how ComfyUI's list semantics work: a node is
called once per element of its longest input list unless it declares `INPUT_IS_LIST`, and an output declared in
`OUTPUT_IS_LIST` contributes its elements rather than itself. Events follow ComfyUI's websocket messages.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.cache import CachedOutput, OutputCache, signature
from engine.context import NodeContext
from engine.errors import ExecutionFailed, ExecutionInterrupted, Interrupted, full_type_name
from engine.graph import Prompt, as_link, upstream_order
from engine.registry import CONTEXT_TYPE, NodeRegistry, call_with_accepted, input_types

log = logging.getLogger(__name__)
Emit = Callable[[str, dict[str, Any]], None]


@dataclass
class RunResult:
    outputs: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # node id -> ui, as in /history
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)


def run_prompt(prompt: Prompt, outputs: list[str], registry: NodeRegistry, cache: OutputCache,
               context: NodeContext, emit: Emit, extra_data: dict[str, Any] | None = None) -> RunResult:
    """Run what `outputs` need; raise `ExecutionFailed` or `ExecutionInterrupted` after emitting the event."""
    extra_data = extra_data or {}
    prompt_id = context.prompt_id
    result = RunResult()
    emit("execution_start", {"prompt_id": prompt_id, "timestamp": _now_ms()})

    needed = upstream_order(prompt, outputs)
    signatures: dict[str, str] = {}
    for node_id in needed:
        signatures[node_id] = _guarded(node_id, prompt, result, emit, context,
                                       lambda: _signature(prompt, node_id, registry, context, signatures))
    hits = {nid: entry for nid in needed if (entry := cache.get(signatures[nid])) is not None}
    order = upstream_order(prompt, outputs, stop=set(hits))
    result.cached = [nid for nid in needed if nid in hits]
    emit("execution_cached", {"nodes": result.cached, "prompt_id": prompt_id, "timestamp": _now_ms()})

    values: dict[str, list[list[Any]]] = {}
    for node_id in result.cached:
        values[node_id] = hits[node_id].outputs
        if hits[node_id].ui:
            result.outputs[node_id] = hits[node_id].ui

    for node_id in (nid for nid in order if nid not in hits):
        emit("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})
        context.progress = _progress_emitter(emit, prompt_id, node_id)
        out, ui = _guarded(node_id, prompt, result, emit, context,
                           lambda: _run_node(prompt, node_id, registry, values, context, extra_data))
        values[node_id] = out
        result.executed.append(node_id)
        cache.put(signatures[node_id], CachedOutput(out, ui))
        if ui:
            result.outputs[node_id] = ui
            emit("executed", {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": prompt_id})
    context.progress = None

    emit("executing", {"node": None, "prompt_id": prompt_id})
    emit("execution_success", {"prompt_id": prompt_id, "timestamp": _now_ms()})
    return result


def _guarded(node_id: str, prompt: Prompt, result: RunResult, emit: Emit, context: NodeContext,
             work: Callable[[], Any]) -> Any:
    """Run one node's work, turning an interrupt or an exception into the event and typed error ComfyUI gives."""
    class_type = prompt[node_id]["class_type"]
    base = {"prompt_id": context.prompt_id, "node_id": node_id, "node_type": class_type,
            "executed": list(result.executed)}
    try:
        context.check_interrupted()
        return work()
    except Interrupted:
        emit("execution_interrupted", {**base, "timestamp": _now_ms()})
        raise ExecutionInterrupted(node_id, class_type) from None
    except Exception as exc:
        tb = traceback.format_tb(exc.__traceback__)
        log.error("node %s (%s) failed: %s: %s", node_id, class_type, type(exc).__name__, exc)
        emit("execution_error", {
            **base,
            "exception_message": str(exc),
            "exception_type": full_type_name(type(exc)),
            "traceback": tb,
            "current_inputs": {k: v for k, v in prompt[node_id]["inputs"].items() if not isinstance(v, list)},
            "current_outputs": list(result.executed),
            "timestamp": _now_ms(),
        })
        raise ExecutionFailed(node_id, class_type, exc, tb) from exc


def _signature(prompt: Prompt, node_id: str, registry: NodeRegistry, context: NodeContext,
               upstream: dict[str, str]) -> str:
    cls = registry.get(prompt[node_id]["class_type"])
    hidden = input_types(cls).get("hidden", {})
    changed = None
    if hasattr(cls, "IS_CHANGED"):
        constants = {k: v for k, v in prompt[node_id]["inputs"].items() if as_link(v) is None}
        constants.update({name: context for name, kind in hidden.items() if kind == CONTEXT_TYPE})
        changed = call_with_accepted(cls.IS_CHANGED, constants)
    per_node = getattr(cls, "NOT_IDEMPOTENT", False) or "UNIQUE_ID" in hidden.values()
    return signature(prompt, node_id, changed, upstream, per_node)


def _run_node(prompt: Prompt, node_id: str, registry: NodeRegistry, values: dict[str, list[list[Any]]],
              context: NodeContext, extra_data: dict[str, Any]) -> tuple[list[list[Any]], dict[str, list] | None]:
    node = prompt[node_id]
    cls = registry.get(node["class_type"])
    spec = input_types(cls)
    declared = {**spec.get("required", {}), **spec.get("optional", {})}
    args: dict[str, list[Any]] = {}
    for name, value in node["inputs"].items():
        if name not in declared:
            continue
        link = as_link(value)
        args[name] = values[link[0]][link[1]] if link else [value]
    hidden_values = {"PROMPT": prompt, "EXTRA_PNGINFO": extra_data.get("extra_pnginfo"), "UNIQUE_ID": node_id,
                     CONTEXT_TYPE: context}
    for name, kind in spec.get("hidden", {}).items():
        if kind in hidden_values:
            args[name] = [hidden_values[kind]]
    returns = _map_over_lists(cls(), cls, args, context)
    return _merge_returns(cls, returns)


def _map_over_lists(instance: Any, cls: type, args: dict[str, list[Any]], context: NodeContext) -> list[Any]:
    function = getattr(instance, cls.FUNCTION)
    if getattr(cls, "INPUT_IS_LIST", False):
        return [function(**args)]
    if any(len(v) == 0 for v in args.values()):
        return []
    calls = max((len(v) for v in args.values()), default=1)
    returns = []
    for i in range(calls):
        if i:
            context.check_interrupted()
        returns.append(function(**{k: v[min(i, len(v) - 1)] for k, v in args.items()}))
    return returns


def _merge_returns(cls: type, returns: list[Any]) -> tuple[list[list[Any]], dict[str, list] | None]:
    slots = len(cls.RETURN_TYPES)
    is_list = getattr(cls, "OUTPUT_IS_LIST", None) or (False,) * slots
    outputs: list[list[Any]] = [[] for _ in range(slots)]
    ui: dict[str, list] | None = None
    for value in returns:
        if isinstance(value, dict):
            if value.get("ui") is not None:
                ui = ui or {}
                for key, items in value["ui"].items():
                    ui.setdefault(key, []).extend(items if isinstance(items, list) else [items])
            value = value.get("result", ())
        if not isinstance(value, tuple) or len(value) != slots:
            raise TypeError(f"{cls.__name__}.{cls.FUNCTION} returned {type(value).__name__}; "
                            f"a node must return a tuple of {slots} values or a dict with 'ui' and 'result'")
        for slot, item in enumerate(value):
            outputs[slot].extend(item) if is_list[slot] else outputs[slot].append(item)
    return outputs, ui


def _progress_emitter(emit: Emit, prompt_id: str | None, node_id: str) -> Callable[[float, float], None]:
    def progress(value: float, total: float) -> None:
        emit("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id})
    return progress


def _now_ms() -> int:
    return int(time.time() * 1000)
