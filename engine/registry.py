"""The node registry and ComfyUI's node class contract.

A node is a class with `INPUT_TYPES()` (required / optional / hidden), `RETURN_TYPES`, optional `RETURN_NAMES`,
`FUNCTION`, `CATEGORY`, `OUTPUT_NODE`, `INPUT_IS_LIST`, `OUTPUT_IS_LIST`, `IS_CHANGED` and `VALIDATE_INPUTS`.
Packages of nodes expose `NODE_CLASS_MAPPINGS` (and optionally `NODE_DISPLAY_NAME_MAPPINGS`) and are registered by
module name, so the engine never imports a node package at import time.

Our extension of the contract: `INPUT_TYPES` may take one argument, the `NodeContext`, for inputs whose options
depend on the disk (files in `input/`), and a hidden input of type `CONTEXT` hands a node the running prompt's
context (folders, this request's uploads, the interrupt check, progress).
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Iterable

NodeClass = type
CONTEXT_TYPE = "CONTEXT"


class NodeRegistry:
    def __init__(self) -> None:
        self.classes: dict[str, NodeClass] = {}
        self.display_names: dict[str, str] = {}

    def register(self, name: str, cls: NodeClass, display_name: str | None = None) -> None:
        self.classes[name] = cls
        if display_name:
            self.display_names[name] = display_name

    def register_module(self, module_name: str) -> None:
        module = importlib.import_module(module_name)
        names = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {})
        for name, cls in module.NODE_CLASS_MAPPINGS.items():
            self.register(name, cls, names.get(name))

    def get(self, name: str) -> NodeClass | None:
        return self.classes.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.classes

    def object_info(self, name: str, context: Any = None) -> dict[str, Any]:
        """One node's `/object_info` entry, in ComfyUI's shape."""
        cls = self.classes[name]
        spec = input_types(cls, context)
        returns = list(cls.RETURN_TYPES)
        is_list = getattr(cls, "OUTPUT_IS_LIST", None) or (False,) * len(returns)
        return {
            "input": spec,
            "input_order": {section: list(spec[section]) for section in ("required", "optional") if section in spec},
            "output": returns,
            "output_is_list": list(is_list),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or returns),
            "name": name,
            "display_name": self.display_names.get(name, name),
            "description": getattr(cls, "DESCRIPTION", "") or "",
            "category": getattr(cls, "CATEGORY", "sd"),
            "output_node": is_output_node(cls),
            "python_module": cls.__module__,
        }


def default_registry(modules: Iterable[str] = ("nodes",)) -> NodeRegistry:
    registry = NodeRegistry()
    for module in modules:
        registry.register_module(module)
    return registry


def input_types(cls: NodeClass, context: Any = None) -> dict[str, dict[str, Any]]:
    """`INPUT_TYPES`, with `required` always present. The context (for option lists read from disk) is given only
    when `/object_info` asks; validation and execution need the input names and types, not the disk listing."""
    method = cls.INPUT_TYPES
    spec = method(context) if _parameters(method) else method()
    spec = dict(spec)
    spec.setdefault("required", {})
    return spec


def is_output_node(cls: NodeClass) -> bool:
    return getattr(cls, "OUTPUT_NODE", False) is True


def call_with_accepted(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Call `fn` with the keyword arguments it declares (all of them if it takes **kwargs), as ComfyUI does for
    `IS_CHANGED` and `VALIDATE_INPUTS`."""
    names = accepted_names(fn)
    return fn(**(kwargs if names is None else {k: v for k, v in kwargs.items() if k in names}))


def accepted_names(fn: Callable[..., Any]) -> set[str] | None:
    """The keyword names `fn` declares; None when it takes **kwargs (everything)."""
    params = _parameters(fn)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


@functools.lru_cache(maxsize=4096)
def _parameters(fn: Callable[..., Any]) -> tuple[inspect.Parameter, ...]:
    # signature() costs tens of microseconds and runs several times per node per prompt; node classes are fixed
    return tuple(inspect.signature(fn).parameters.values())
