"""Start-up work before a replica takes traffic: fetch the models `preload` names (and, with `preload_load`, load
them into the resident cache), then run the warm-up prompt once through the executor.

It runs on a background thread started after the server accepts connections, so that health checks answer while
weights arrive; `/readyz` reports the phase ("starting", "preloading", "warming_up") with 503 until it is done.
A failure is logged and leaves `/readyz` at 503 for good ("preload_failed" or "warmup_failed", with the error):
a replica that cannot warm up must not take traffic. With neither setting, the replica is ready at once.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.checkpoints import open_checkpoint, open_vae
from engine.errors import EngineError, InvalidPrompt
from engine.settings import Settings

log = logging.getLogger(__name__)

LOADABLE = ("checkpoints", "vae")  # folders whose files `preload_load` loads; others are only fetched
_FAILED = {"preloading": "preload_failed", "warming_up": "warmup_failed"}


class StartupError(EngineError):
    """Start-up could not finish; the message says which model or prompt and why."""


@dataclass(frozen=True)
class ReadinessState:
    status: str  # starting, preloading, warming_up, ready, preload_failed, warmup_failed
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status} if self.error is None else {"status": self.status, "error": self.error}


class Readiness:
    """Where start-up stands; written by the start-up thread, read by `/readyz`."""

    def __init__(self) -> None:
        self._state = ReadinessState("starting")  # replaced whole, so readers never see half an update

    @property
    def state(self) -> ReadinessState:
        return self._state

    def enter(self, status: str) -> None:
        self._state = ReadinessState(status)

    def fail(self, error: str) -> None:
        self._state = ReadinessState(_FAILED.get(self._state.status, self._state.status + "_failed"), error)


def start(executor: Any, settings: Settings) -> tuple[Readiness, threading.Event]:
    """Begin start-up work on a daemon thread; returns its readiness and an event that stops it early."""
    readiness, stop = Readiness(), threading.Event()
    if not settings.preload.strip(" ,") and settings.warmup_prompt is None:
        readiness.enter("ready")
        return readiness, stop
    threading.Thread(target=run, args=(executor, settings, readiness, stop), name="startup", daemon=True).start()
    return readiness, stop


def run(executor: Any, settings: Settings, readiness: Readiness, stop: threading.Event) -> None:
    """Preload, then warm up; the outcome is left in `readiness`."""
    started = time.perf_counter()
    try:
        readiness.enter("preloading")
        preload(executor, settings, stop)
        readiness.enter("warming_up")
        if settings.warmup_prompt is not None and not stop.is_set():
            warm_up(executor, settings.warmup_prompt, stop)
    except Exception as exc:  # any failure keeps the replica out of rotation, with the reason on /readyz
        log.error("start-up failed while %s: %s", readiness.state.status.replace("_", " "), exc,
                  exc_info=not isinstance(exc, EngineError))
        readiness.fail(str(exc))
        return
    if stop.is_set():
        return
    readiness.enter("ready")
    log.info("ready after %.1f s of start-up work", time.perf_counter() - started)


def preload_entries(text: str) -> list[tuple[str, str]]:
    """`folder/name` entries of the `preload` setting, comma-separated (names may contain subfolders)."""
    entries = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        folder, _, name = item.partition("/")
        if not name:
            raise StartupError(f"preload entry {item!r} needs a folder: write it as folder/name, "
                               "e.g. checkpoints/sd_xl_base_1.0.safetensors")
        entries.append((folder, name))
    return entries


def preload(executor: Any, settings: Settings, stop: threading.Event | None = None) -> None:
    for folder, name in preload_entries(settings.preload):
        if stop is not None and stop.is_set():
            return
        started = time.perf_counter()
        try:
            path = executor.models.find(folder, name)
        except EngineError as exc:
            raise StartupError(f"preload of {folder}/{name}: {exc}") from exc
        log.info("preload: %s/%s is at %s (%.1f s)", folder, name, path, time.perf_counter() - started)
        if not settings.preload_load:
            continue
        if folder not in LOADABLE:
            log.info("preload: %s/%s fetched only (loading at start applies to %s)", folder, name,
                     " and ".join(LOADABLE))
            continue
        try:
            if folder == "checkpoints":
                open_checkpoint(path, executor.policy, executor.resident, models=executor.models, folder=folder)
            else:
                open_vae(path, executor.policy, executor.resident, folder=folder)
        except EngineError as exc:
            raise StartupError(f"preload of {folder}/{name} could not load it: {exc}") from exc


def read_prompt(path: Path) -> dict[str, Any]:
    """An API-format prompt from a file: the bare prompt, or ComfyUI's `{"prompt": {...}}` envelope."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StartupError(f"warm-up prompt {path} could not be read: {exc.strerror}") from exc
    except ValueError as exc:
        raise StartupError(f"warm-up prompt {path} is not JSON: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]
    if not isinstance(data, dict):
        raise StartupError(f"warm-up prompt {path} must hold an API-format prompt (a JSON object of nodes)")
    return data


def warm_up(executor: Any, path: Path, stop: threading.Event | None = None) -> None:
    """Run the prompt in `path` once through the executor's queue and wait for it; raise unless it succeeds."""
    prompt = read_prompt(path)
    try:
        validated = executor.validate(prompt)
    except InvalidPrompt as exc:
        raise StartupError(f"warm-up prompt {path.name} is invalid: {_describe(exc.error, exc.node_errors)}") from exc
    if validated.node_errors:
        raise StartupError(f"warm-up prompt {path.name} is invalid: {_describe(None, validated.node_errors)}")
    done, outcomes = threading.Event(), []
    started = time.perf_counter()

    def finished(outcome: Any) -> None:
        outcomes.append(outcome)
        done.set()

    executor.submit(validated, prompt, on_done=finished)
    while not done.wait(0.2):
        if stop is not None and stop.is_set():
            return
    outcome = outcomes[0]
    if outcome.status != "success":
        raise StartupError(f"warm-up prompt {path.name} did not run: {outcome.error}")
    log.info("warm-up prompt %s ran in %.1f s", path.name, time.perf_counter() - started)


def _describe(error: dict[str, Any] | None, node_errors: dict[str, Any]) -> str:
    parts = [f"{error['message']}: {error['details']}" if error and error.get("details") else
             (error or {}).get("message", "")]
    for node_id, entry in node_errors.items():
        for item in entry.get("errors", []):
            parts.append(f"node {node_id} ({entry.get('class_type')}): {item.get('message')}: {item.get('details')}")
    return "; ".join(p for p in parts if p)
