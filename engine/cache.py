"""The node-output cache: results of earlier prompts, found again by a node's input signature.

A signature covers the node's class, its constant inputs, its `IS_CHANGED` value and, through links, the
signatures of everything upstream, so changing the seed of a sampler invalidates that sampler and what follows it,
and nothing else.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from engine.graph import Prompt, as_link


@dataclass(frozen=True)
class CachedOutput:
    outputs: list[list[Any]]  # one list of values per output slot
    ui: dict[str, list[Any]] | None


class OutputCache:
    """Least-recently-used map of signature -> outputs, bounded by entry count."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, CachedOutput] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, signature: str) -> CachedOutput | None:
        with self._lock:
            entry = self._entries.get(signature)
            if entry is not None:
                self._entries.move_to_end(signature)
            return entry

    def put(self, signature: str, entry: CachedOutput) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._entries[signature] = entry
            self._entries.move_to_end(signature)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def signature(prompt: Prompt, node_id: str, changed: Any, upstream: dict[str, str], per_node: bool) -> str:
    """Hash of a node's inputs; `upstream` holds the signatures of the nodes it links to.

    `changed` is the node's `IS_CHANGED` result; NaN (ComfyUI's "always changed") makes the node uncacheable.
    `per_node` adds the node id, for nodes that see their own id and so may behave differently per node.
    """
    if isinstance(changed, float) and math.isnan(changed):
        changed = uuid.uuid4().hex
    node = prompt[node_id]
    inputs = []
    for name, value in sorted(node["inputs"].items()):
        link = as_link(value)
        inputs.append([name, ["link", upstream[link[0]], link[1]]] if link else [name, value])
    key = [node["class_type"], node_id if per_node else None, changed, inputs]
    return hashlib.sha256(json.dumps(key, default=repr, sort_keys=True).encode()).hexdigest()
