"""`comfy-endpoint run`: one prompt through the same executor as the server, without HTTP."""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.executor import Executor
from engine.folders import Folders
from engine.imagestore import LocalImageStore
from engine.jobs import Outcome
from engine.registry import default_registry
from engine.settings import Settings
from handler.body import envelope, parse_json
from handler.errors import body_of, status_of


def run_once(settings: Settings, text: str, out: Path | None = None) -> tuple[int, dict[str, Any]]:
    """(exit code, JSON summary): 0 ran, 1 the prompt is invalid (bad JSON or validation), 2 it failed."""
    settings = replace(settings, max_queue=max(settings.max_queue, 1))
    folders = Folders(settings.input_dir, out or settings.output_dir, settings.temp_dir)
    executor = Executor(settings, default_registry(), LocalImageStore(settings.images_dir), folders)
    try:
        body = envelope(parse_json(text.encode()))
        validated = executor.validate(body.prompt)
    except EngineError as exc:
        return 1, body_of(exc)
    done = threading.Event()
    result: list[Outcome] = []

    def finished(outcome: Outcome) -> None:
        result.append(outcome)
        done.set()

    executor.start()
    try:
        executor.submit(validated, body.prompt, extra_data=body.extra_data, on_done=finished)
        done.wait()
    finally:
        executor.stop()
    outcome = result[0]
    if outcome.error is not None:
        return (1 if status_of(outcome.error) < 500 else 2), body_of(outcome.error)
    return 0, {"prompt_id": outcome.prompt_id, "status": outcome.status, "outputs": outcome.outputs,
               "files": _files(folders, outcome.outputs)}


def _files(folders: Folders, outputs: dict[str, Any]) -> list[str]:
    paths = []
    for ui in outputs.values():
        for item in ui.get("images", []):
            paths.append(str(folders.resolve(item["type"], item.get("subfolder", ""), item["filename"])))
    return paths
