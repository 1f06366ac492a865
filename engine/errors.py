"""Typed errors of the engine.

Each error says what went wrong in words a caller can act on; `handler/errors.py` maps each type to one HTTP
status code, in one table. Nothing here knows about HTTP.
"""
from __future__ import annotations

from typing import Any


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class BadRequest(EngineError):
    """The request itself is malformed (not JSON, wrong shape, a bad parameter)."""


class NotFound(EngineError):
    """The thing asked for does not exist."""


class Forbidden(EngineError):
    """The request names a path outside the folders it may touch."""


class InvalidPrompt(EngineError):
    """The prompt failed validation; `error` and `node_errors` have ComfyUI's shapes."""

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any] | None = None):
        super().__init__(f"{error['message']}: {error['details']}" if error.get("details") else error["message"])
        self.error = error
        self.node_errors = node_errors or {}


class QueueFull(EngineError):
    """Admission control refused the prompt: the queue is at its configured limit."""

    def __init__(self, pending: int, limit: int):
        super().__init__(f"the queue holds {pending} prompts, its limit is {limit}; retry later or on another replica")
        self.pending = pending
        self.limit = limit


class Draining(EngineError):
    """The service is shutting down and takes no new work."""


class StorageError(EngineError):
    """Writing or reading a file failed (no space left, I/O error, read-only file system)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class Interrupted(EngineError):
    """Raised by a node's interrupt check when the running prompt was interrupted."""


class ExecutionFailed(EngineError):
    """A node raised while the prompt ran; carries what ComfyUI reports in `execution_error`."""

    def __init__(self, node_id: str, class_type: str, cause: BaseException, traceback: list[str]):
        super().__init__(f"node {node_id} ({class_type}) failed: {type(cause).__name__}: {cause}")
        self.node_id = node_id
        self.class_type = class_type
        self.cause = cause
        self.traceback = traceback

    @property
    def exception_type(self) -> str:
        return full_type_name(type(self.cause))

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "class_type": self.class_type,
            "exception_type": self.exception_type,
            "exception_message": str(self.cause),
        }


class ExecutionInterrupted(EngineError):
    """The prompt was interrupted (by `/interrupt`) before it finished."""

    def __init__(self, node_id: str | None, class_type: str | None):
        where = f" at node {node_id} ({class_type})" if node_id else ""
        super().__init__(f"the prompt was interrupted{where}")
        self.node_id = node_id
        self.class_type = class_type


def full_type_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
