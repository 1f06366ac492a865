"""The prompt as a graph: links between nodes and the order in which the nodes an output needs can run."""
from __future__ import annotations

from typing import Any, Iterator

Prompt = dict[str, dict[str, Any]]
Link = tuple[str, int]


def as_link(value: Any) -> Link | None:
    """`[node_id, output_index]` as a tuple, or None when `value` is not a well-formed link."""
    if not isinstance(value, list) or len(value) != 2:
        return None
    node_id, index = value
    if isinstance(node_id, bool) or not isinstance(node_id, (str, int)):
        return None
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return None
    return str(node_id), index


def links(node: dict[str, Any]) -> Iterator[tuple[str, Link]]:
    for name, value in node.get("inputs", {}).items():
        link = as_link(value)
        if link is not None:
            yield name, link


def upstream_order(prompt: Prompt, roots: list[str], stop: set[str] = frozenset()) -> list[str]:
    """The nodes `roots` depend on, roots included, each after everything it links to (a validated prompt has
    no cycles). Nodes in `stop` are included but not looked through (their output is already known)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        if node_id not in stop:
            for _name, (source, _index) in links(prompt[node_id]):
                visit(source)
        order.append(node_id)

    for root in roots:
        visit(root)
    return order
