"""Bounded history of finished prompts, in ComfyUI's `/history` shape, oldest dropped first."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class History:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, prompt_id: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self._entries[prompt_id] = entry
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get(self, prompt_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._entries.get(prompt_id)

    def latest(self, max_items: int | None = None, offset: int = -1) -> dict[str, dict[str, Any]]:
        """ComfyUI's paging: without an offset, the newest `max_items` entries, oldest first."""
        with self._lock:
            items = list(self._entries.items())
        if offset < 0:
            offset = max(0, len(items) - max_items) if max_items is not None else 0
        end = None if max_items is None else offset + max_items
        return dict(items[offset:end])

    def delete(self, prompt_ids: list[str]) -> None:
        with self._lock:
            for prompt_id in prompt_ids:
                self._entries.pop(prompt_id, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
