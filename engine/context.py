"""What a node may reach while a prompt is validated or run: the folders, this request's uploads, the interrupt
check and the progress reporter. Passed explicitly (the hidden `CONTEXT` input), never read from a global."""
from __future__ import annotations

import hashlib
import threading

import torch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.devices import DevicePolicy, policy_for
from engine.errors import EngineError, Interrupted, NotFound
from engine.files import FileNumbers
from engine.folders import Folders
from engine.modelfiles import ModelFiles
from engine.outputstore import OutputStore
from engine.residency import ModelCache

ProgressFn = Callable[[float, float], None]


@dataclass
class NodeContext:
    folders: Folders
    uploads: dict[str, Path] = field(default_factory=dict)  # this request's files, seen before input/
    interrupt_event: threading.Event = field(default_factory=threading.Event)
    progress: ProgressFn | None = None
    prompt_id: str | None = None
    file_numbers: FileNumbers = field(default_factory=FileNumbers)  # shared by the executor's prompts
    models: ModelFiles | None = None  # models/<folder>/ of the data directory
    policy: DevicePolicy = field(default_factory=lambda: policy_for(torch.device("cpu")))  # the executor's device
    resident: ModelCache | None = None  # the executor's resident models; None: every load private (unit tests)
    output_store: OutputStore | None = None  # shared copy of saved files, for /view on other replicas

    def check_interrupted(self) -> None:
        """Long-running nodes call this between steps; it raises once the prompt is interrupted."""
        if self.interrupt_event.is_set():
            raise Interrupted("interrupted")

    def report_progress(self, value: float, total: float) -> None:
        if self.progress is not None:
            self.progress(value, total)
        self.check_interrupted()

    def model_path(self, folder: str, name: str) -> Path:
        if self.models is None:
            raise NotFound("this context has no model folders")
        # a download reports its bytes as the node's progress, and an interrupt stops it
        return self.models.find(folder, name, progress=self.report_progress if self.progress is not None else None)

    def model_names(self, folder: str) -> list[str]:
        return self.models.list(folder) if self.models is not None else []

    def input_digest(self, name: str) -> str:
        """sha256 of an input file: what loaders of input files return from IS_CHANGED."""
        return hashlib.sha256(self.input_path(name).read_bytes()).hexdigest()

    def check_input(self, name: str, what: str = "image") -> bool | str:
        """VALIDATE_INPUTS of loaders of input files: True, or why the file cannot be used (a 400, not a 500)."""
        try:
            self.input_path(name)
        except EngineError as exc:
            return f"Invalid {what} file: {name} ({exc})"
        return True

    def input_path(self, name: str) -> Path:
        """An input file by the name a prompt uses: this request's upload first, then the data folders."""
        if name in self.uploads:
            return self.uploads[name]
        path = self.folders.annotated(name)
        if not path.is_file():
            raise NotFound(f"no file {name!r} in the input folder (upload it with /upload/image or in the request)")
        return path
