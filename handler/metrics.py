"""Prometheus metrics: `GET /metrics` in the text exposition format, from a registry the app owns.

What is measured, and where it comes from:
- requests: an ASGI middleware times every HTTP request, labelled by method, route template (`/view`,
  `/api/v1/images/{digest}`, `<unmatched>` for 404s of unknown paths, so labels stay few) and status;
- prompts and nodes: the executor's events (engine/execution.py), on the executor thread: `execution_start` to
  `execution_success`/`_error`/`_interrupted` times a prompt, one `executing` to the next times a node (labelled
  by its class), `execution_cached` counts the nodes answered from the node-output cache;
- models: the `model_download`, `model_load` and `model_evict` events (seconds and bytes);
- live state, read at scrape time: prompts waiting (`queue_depth`), waiting plus running (`prompts_in_flight`,
  what an autoscaler sizes the fleet by: queue depth alone reads 0 while every replica is busy with no backlog),
  the queue limit, whether the replica drains, and the device memory in use (the CUDA allocator's bytes on a GPU,
  the process's resident set on the CPU); plus the standard `process_*` metrics.

No metric lives in prometheus-client's global default registry: each app (and each test) has its own.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.errors import NotFound

PREFIX = "comfy_endpoint"
# requests and prompts block for as long as a prompt runs: buckets up to ten minutes
LONG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
NODE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MODEL_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
UNMATCHED = "<unmatched>"


class Metrics:
    """The app's metrics; `Metrics(executor)` also subscribes to the executor's events."""

    def __init__(self, executor: Any | None = None):
        self.registry = CollectorRegistry()
        registry = self.registry
        ProcessCollector(registry=registry)
        self.requests = Histogram(f"{PREFIX}_request_duration_seconds", "HTTP request latency",
                                  ["method", "route", "status"], buckets=LONG_BUCKETS, registry=registry)
        self.prompts = Histogram(f"{PREFIX}_prompt_duration_seconds", "prompt execution time, by outcome",
                                 ["status"], buckets=LONG_BUCKETS, registry=registry)
        self.nodes = Histogram(f"{PREFIX}_node_duration_seconds", "node execution time, by node class",
                               ["class_type"], buckets=NODE_BUCKETS, registry=registry)
        self.cache_hits = Counter(f"{PREFIX}_node_cache_hits", "nodes answered from the node-output cache",
                                  ["class_type"], registry=registry)
        self.downloads = Histogram(f"{PREFIX}_model_download_seconds", "model file download time, by folder",
                                   ["folder"], buckets=MODEL_BUCKETS, registry=registry)
        self.download_bytes = Counter(f"{PREFIX}_model_download_bytes", "model bytes downloaded, by folder",
                                      ["folder"], registry=registry)
        self.loads = Histogram(f"{PREFIX}_model_load_seconds", "model load time into memory, by folder",
                               ["folder"], buckets=MODEL_BUCKETS, registry=registry)
        self.load_bytes = Counter(f"{PREFIX}_model_load_bytes", "model bytes loaded, by folder", ["folder"],
                                  registry=registry)
        self.evictions = Counter(f"{PREFIX}_model_evictions", "models evicted from memory", registry=registry)
        self.evicted_bytes = Counter(f"{PREFIX}_model_evicted_bytes", "bytes of evicted models", registry=registry)
        self.executor = executor
        self._timing = PromptTiming()
        if executor is not None:
            registry.register(LiveState(executor))
            executor.add_listener(self.on_event)

    def on_event(self, event: str, data: dict[str, Any], client_id: str | None = None) -> None:
        """The executor's listener (called on the executor thread, for every event)."""
        if event == "executing":
            self._node_done(self._timing.node_started(data.get("prompt_id"), data.get("node")))
        elif event == "execution_start":
            self._timing.prompt_started(data.get("prompt_id"))
        elif event == "execution_cached":
            for node in data.get("nodes", []):
                self.cache_hits.labels(self._class_of(data.get("prompt_id"), node)).inc()
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            seconds = self._timing.prompt_ended(data.get("prompt_id"))
            if seconds is not None:
                self.prompts.labels(event.removeprefix("execution_")).observe(seconds)
        elif event == "model_download":
            self.downloads.labels(data.get("folder", "")).observe(float(data.get("seconds", 0)))
            self.download_bytes.labels(data.get("folder", "")).inc(int(data.get("bytes", 0)))
        elif event == "model_load":
            self.loads.labels(data.get("folder", "")).observe(float(data.get("seconds", 0)))
            self.load_bytes.labels(data.get("folder", "")).inc(int(data.get("bytes", 0)))
        elif event == "model_evict":
            self.evictions.inc()
            self.evicted_bytes.inc(int(data.get("bytes", 0)))

    def _node_done(self, finished: tuple[str, str, float] | None) -> None:
        if finished is not None:
            prompt_id, node, seconds = finished
            self.nodes.labels(self._class_of(prompt_id, node)).observe(seconds)

    def _class_of(self, prompt_id: str | None, node: str) -> str:
        """The node's class, from the running job's prompt (events carry node ids only)."""
        job = self.executor.queue.running if self.executor is not None else None
        if job is None or job.prompt_id != prompt_id:
            return "unknown"
        return str(job.prompt.get(node, {}).get("class_type", "unknown"))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class PromptTiming:
    """Start times of running prompts and of each prompt's current node (events come one prompt at a time, but
    a lock keeps this safe should several executors share one Metrics)."""

    def __init__(self) -> None:
        self._prompts: dict[Any, float] = {}
        self._nodes: dict[Any, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def prompt_started(self, prompt_id: Any) -> None:
        with self._lock:
            self._prompts[prompt_id] = time.perf_counter()
            self._nodes.pop(prompt_id, None)

    def node_started(self, prompt_id: Any, node: str | None) -> tuple[str, str, float] | None:
        """Start timing `node` (None: the prompt's nodes are done); returns the node that just finished."""
        now = time.perf_counter()
        with self._lock:
            previous = self._nodes.pop(prompt_id, None)
            if node is not None:
                self._nodes[prompt_id] = (node, now)
        return None if previous is None else (prompt_id, previous[0], now - previous[1])

    def prompt_ended(self, prompt_id: Any) -> float | None:
        with self._lock:
            self._nodes.pop(prompt_id, None)  # a failed or interrupted node is not timed
            started = self._prompts.pop(prompt_id, None)
        return None if started is None else time.perf_counter() - started


class LiveState(Collector):
    """Values read from the executor at scrape time."""

    def __init__(self, executor: Any):
        self.executor = executor

    def collect(self) -> Iterator[Metric]:
        executor = self.executor
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "prompts waiting to run", executor.queue.pending_count())
        yield GaugeMetricFamily(f"{PREFIX}_prompts_in_flight", "prompts waiting or running", executor.remaining())
        yield GaugeMetricFamily(f"{PREFIX}_queue_limit", "most prompts allowed to wait (beyond it: 429)",
                                executor.settings.max_queue)
        yield GaugeMetricFamily(f"{PREFIX}_draining", "1 once the replica stopped taking prompts",
                                0 if executor.accepting else 1)
        memory = GaugeMetricFamily(f"{PREFIX}_device_memory_bytes", "memory in use on the executor's device",
                                   labels=["device", "kind"])
        for device, kind, value in device_memory(executor.policy.device):
            memory.add_metric([device, kind], value)
        yield memory


def device_memory(device: Any) -> list[tuple[str, str, int]]:
    """(device, kind, bytes): the CUDA caching allocator's allocated and reserved bytes on a GPU; the process's
    resident set on the CPU (Linux's /proc; nothing elsewhere)."""
    if device.type == "cuda":
        import torch  # already loaded by the engine; imported here so the HTTP layer needs it only on a GPU

        name = str(device)
        return [(name, "allocated", torch.cuda.memory_allocated(device)),
                (name, "reserved", torch.cuda.memory_reserved(device))]
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return []
    return [(str(device), "rss", resident_pages * os.sysconf("SC_PAGE_SIZE"))]


class RequestMetrics:
    """ASGI middleware: request latency by method, route template and status, into `app.state.metrics`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
        if scope["type"] != "http" or metrics is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        root_path = scope.get("root_path", "")
        status = 500  # what the client gets when the app raises before answering

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            metrics.observe_request(scope["method"], route_template(scope, root_path), status,
                                    time.perf_counter() - started)


def route_template(scope: Scope, root_path: str) -> str:
    """The matched route's path template with the prefixes of the mounts it sits in (`/api/view`)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is None:
        return UNMATCHED
    mounted = scope.get("root_path", "")[len(root_path):]
    return mounted + path


async def metrics_endpoint(request: Request) -> Response:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is None:
        raise NotFound("metrics are not collected by this app")
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [Route("/metrics", metrics_endpoint, methods=["GET"])]
