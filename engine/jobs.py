"""Jobs and the job queue with ComfyUI's semantics: a priority `number` (lower runs first, `front` jumps the
line), delete by prompt id, clear, and a snapshot of what is running and pending."""
from __future__ import annotations

import heapq
import itertools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.errors import EngineError
from engine.imagestore import StoredImage


@dataclass
class Outcome:
    prompt_id: str
    status: str  # "success", "error" or "interrupted"
    outputs: dict[str, Any] = field(default_factory=dict)
    error: EngineError | None = None
    primary: StoredImage | None = None  # the last image of the last SaveImage node


@dataclass
class Job:
    number: float
    prompt_id: str
    prompt: dict[str, Any]  # validated, constants coerced
    outputs: list[str]
    source_prompt: dict[str, Any]  # as the client sent it, for GET /api/v1/prompts
    extra_data: dict[str, Any] = field(default_factory=dict)
    client_id: str | None = None
    uploads: dict[str, Path] = field(default_factory=dict)
    scratch: Path | None = None  # removed once the job ends (this request's uploaded files)
    digest: str | None = None  # store the primary image under this digest
    on_done: Callable[[Outcome], None] | None = None
    interrupt: threading.Event = field(default_factory=threading.Event)

    def queue_tuple(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data]


class JobQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Job | None]] = []
        self._seq = itertools.count()
        self._ready = threading.Condition()
        self.running: Job | None = None

    def put(self, job: Job | None) -> None:
        """Add a job; None is the stop signal, which sorts after every job."""
        with self._ready:
            heapq.heappush(self._heap, (float("inf") if job is None else job.number, next(self._seq), job))
            self._ready.notify()

    def take(self) -> Job | None:
        """Block for the next job and mark it running; None means stop."""
        with self._ready:
            while not self._heap:
                self._ready.wait()
            job = heapq.heappop(self._heap)[2]
            self.running = job
            return job

    def finish(self) -> None:
        with self._ready:
            self.running = None

    def pending(self) -> list[Job]:
        with self._ready:
            return [job for _n, _s, job in sorted(self._heap) if job is not None]

    def pending_count(self) -> int:
        with self._ready:
            return sum(1 for entry in self._heap if entry[2] is not None)

    def remove(self, keep: Callable[[Job], bool]) -> list[Job]:
        """Drop pending jobs for which `keep` is false; return them."""
        with self._ready:
            dropped = [e[2] for e in self._heap if e[2] is not None and not keep(e[2])]
            self._heap = [e for e in self._heap if e[2] is None or keep(e[2])]
            heapq.heapify(self._heap)
            return dropped
