"""The executor: one thread that owns the device and runs queued prompts one at a time.

This is the one place that holds the service's mutable state: the job queue, the running job, the history, the
node-output cache, the last-prompt record and the event listeners. The HTTP layer talks to it through the methods
below and receives each job's `Outcome` through the job's `on_done` callback (called on the executor thread).
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from engine.cache import OutputCache
from engine.context import NodeContext
from engine.errors import Draining, ExecutionFailed, ExecutionInterrupted, QueueFull, StorageError
from engine.execution import run_prompt
from engine.devices import policy_for, resolve_device
from engine.files import FileNumbers
from engine.folders import Folders
from engine.history import History
from engine.imagestore import ImageStore, StoredImage
from engine.jobs import Job, JobQueue, Outcome
from engine.modelfiles import ModelFiles
from engine.outputstore import output_store_from_settings
from engine.residency import ModelCache
from engine.registry import NodeRegistry
from engine.settings import Settings
from engine.validation import Validated, validate_prompt

log = logging.getLogger(__name__)
Listener = Callable[[str, dict[str, Any], "str | None"], None]
PRIMARY_CLASS = "SaveImage"
_RECORDED_EVENTS = ("execution_start", "execution_cached", "execution_success", "execution_error",
                    "execution_interrupted")


class Executor:
    def __init__(self, settings: Settings, registry: NodeRegistry, store: ImageStore, folders: Folders | None = None):
        self.settings = settings
        self.registry = registry
        self.store = store
        self.output_store = output_store_from_settings(settings)  # None: saved files stay local
        self.folders = folders or Folders(settings.input_dir, settings.output_dir, settings.temp_dir)
        self.cache = OutputCache(settings.cache_size)
        self.history = History(settings.history_size)
        self.queue = JobQueue()
        self.file_numbers = FileNumbers()
        self.models = ModelFiles.from_settings(settings, events=self.emit)
        self.policy = policy_for(resolve_device(settings.device))
        self.resident = ModelCache.from_settings(settings, self.policy.device, events=self.emit)
        self.last_prompt: dict[str, Any] | None = None
        self.accepting = True
        self._listeners: list[Listener] = []
        self._number = 0
        self._admission_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.folders.ensure()
        shutil.rmtree(self.folders.temp, ignore_errors=True)  # previews of an earlier run, as ComfyUI does
        self.folders.temp.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="executor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking work, let queued jobs finish, then end the thread."""
        self.accepting = False
        if self._thread is not None:
            self.queue.put(None)
            self._thread.join(timeout)

    # -- events -----------------------------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, event: str, data: dict[str, Any], client_id: str | None = None) -> None:
        for listener in self._listeners:
            try:
                listener(event, data, client_id)
            except Exception:  # a broken listener must not stop a prompt
                log.exception("event listener failed on %s", event)

    def _queue_changed(self) -> None:
        self.emit("status", {"status": {"exec_info": {"queue_remaining": self.remaining()}}})

    # -- admission --------------------------------------------------------------------------------------------
    def context(self, uploads: dict[str, Path] | None = None, prompt_id: str | None = None,
                interrupt: threading.Event | None = None) -> NodeContext:
        return NodeContext(self.folders, dict(uploads or {}), interrupt or threading.Event(), prompt_id=prompt_id,
                           file_numbers=self.file_numbers, models=self.models, policy=self.policy,
                           resident=self.resident, output_store=self.output_store)

    def validate(self, prompt: Any, uploads: dict[str, Path] | None = None) -> Validated:
        return validate_prompt(prompt, self.registry, self.context(uploads))

    def check_admission(self) -> None:
        if not self.accepting:
            raise Draining("this replica is shutting down; send the prompt to another one")
        pending = self.queue.pending_count()
        if pending >= self.settings.max_queue:
            raise QueueFull(pending, self.settings.max_queue)

    def submit(self, validated: Validated, source_prompt: dict[str, Any], *, extra_data: dict | None = None,
               client_id: str | None = None, front: bool = False, number: float | None = None,
               prompt_id: str | None = None, uploads: dict[str, Path] | None = None, scratch: Path | None = None,
               digest: str | None = None, on_done: Callable[[Outcome], None] | None = None) -> Job:
        with self._admission_lock:  # check and enqueue together, so concurrent requests cannot overshoot
            self.check_admission()
            if number is None:
                number = -self._number if front else self._number
            self._number += 1
            job = Job(number=number, prompt_id=prompt_id or str(uuid.uuid4()), prompt=validated.prompt,
                      outputs=validated.outputs, source_prompt=source_prompt, extra_data=extra_data or {},
                      client_id=client_id, uploads=dict(uploads or {}), scratch=scratch, digest=digest,
                      on_done=on_done)
            self.queue.put(job)
        self._queue_changed()
        return job

    # -- queue control ----------------------------------------------------------------------------------------
    def remaining(self) -> int:
        return self.queue.pending_count() + (1 if self.queue.running is not None else 0)

    def delete(self, prompt_ids: list[str]) -> None:
        wanted = set(prompt_ids)
        self._cancel(self.queue.remove(lambda job: job.prompt_id not in wanted))

    def clear(self) -> None:
        self._cancel(self.queue.remove(lambda job: False))

    def _cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._finish(job, Outcome(job.prompt_id, "interrupted", error=ExecutionInterrupted(None, None)))
        self._queue_changed()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running prompt (only if it is `prompt_id`, when given)."""
        job = self.queue.running
        if job is None or (prompt_id is not None and job.prompt_id != prompt_id):
            return False
        job.interrupt.set()
        return True

    # -- the executor thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self.queue.take()
            if job is None:
                self.queue.finish()
                return
            self._queue_changed()
            try:
                outcome = self._run(job)
            except Exception as exc:  # an engine bug; report it on the job instead of killing the thread
                log.exception("prompt %s failed outside any node", job.prompt_id)
                outcome = Outcome(job.prompt_id, "error", error=ExecutionFailed("", "", exc, []))
            self.queue.finish()
            self._finish(job, outcome)
            self._queue_changed()

    def _run(self, job: Job) -> Outcome:
        messages: list[list[Any]] = []

        def emit(event: str, data: dict[str, Any]) -> None:
            if event in _RECORDED_EVENTS:
                messages.append([event, data])
            self.emit(event, data, job.client_id)

        context = self.context(job.uploads, job.prompt_id, job.interrupt)
        started = time.perf_counter()
        try:
            result = run_prompt(job.prompt, job.outputs, self.registry, self.cache, context, emit, job.extra_data)
        except (ExecutionFailed, ExecutionInterrupted) as exc:
            status = "interrupted" if isinstance(exc, ExecutionInterrupted) else "error"
            outcome = Outcome(job.prompt_id, status, error=exc)
        else:
            outcome = Outcome(job.prompt_id, "success", outputs=result.outputs)
            try:
                outcome.primary = self._primary_image(job, result.outputs)
            except StorageError as exc:
                outcome.status, outcome.error = "error", exc
            self.last_prompt = job.source_prompt
        log.info("prompt %s %s in %.1f ms", job.prompt_id, outcome.status, (time.perf_counter() - started) * 1e3)
        self.history.record(job.prompt_id, {
            "prompt": job.queue_tuple(),
            "outputs": outcome.outputs,
            "status": {"status_str": "success" if outcome.status == "success" else "error",
                       "completed": outcome.status == "success", "messages": messages},
            "timestamp": time.time(),
        })
        return outcome

    def _finish(self, job: Job, outcome: Outcome) -> None:
        if outcome.status == "interrupted" and not self.accepting:  # cut short by a drain: 503, run it elsewhere
            outcome.error = Draining("this replica shut down before the prompt finished; send it to another one")
        if job.scratch is not None:
            shutil.rmtree(job.scratch, ignore_errors=True)
        if job.on_done is not None:
            job.on_done(outcome)

    def _primary_image(self, job: Job, outputs: dict[str, Any]) -> StoredImage | None:
        """The last image of the last SaveImage node in the prompt, stored under the job's digest if it has one."""
        saves = [nid for nid, node in job.prompt.items()
                 if node["class_type"] == PRIMARY_CLASS and outputs.get(nid, {}).get("images")]
        if not saves:
            return None
        info = outputs[saves[-1]]["images"][-1]
        path = self.folders.resolve(info.get("type", "output"), info.get("subfolder", ""), info["filename"])
        try:
            image = StoredImage(path.read_bytes(), dict(info))
        except OSError as exc:
            raise StorageError(f"could not read the saved image {info['filename']}: {exc.strerror}", exc.errno)
        if job.digest is not None:
            self.store.put(job.digest, image)
        return image
