"""Errors -> HTTP status codes, in one table, and the JSON bodies that say what to fix."""
from __future__ import annotations

import errno
import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from engine.errors import (BadRequest, Draining, EngineError, ExecutionFailed, ExecutionInterrupted, Forbidden,
                           InvalidPrompt, NotFound, QueueFull, StorageError)
from engine.hub import HubOffline, HubUnavailable
from handler.responses import JSONResponse

log = logging.getLogger(__name__)


class PayloadTooLarge(EngineError):
    """The request body is larger than the configured limit."""


class UnsupportedMediaType(BadRequest):
    """The body's content type is not one this route reads."""


# Most specific first: the first matching row decides.
STATUS: list[tuple[type[Exception], int]] = [
    (InvalidPrompt, 400),
    (BadRequest, 400),
    (Forbidden, 403),
    (NotFound, 404),
    (PayloadTooLarge, 413),
    (QueueFull, 429),
    (ExecutionInterrupted, 500),
    (StorageError, 507),
    (ExecutionFailed, 500),
    (HubOffline, 503),
    (HubUnavailable, 502),
    (Draining, 503),
]


def status_of(exc: BaseException) -> int:
    if isinstance(exc, ExecutionFailed):
        if _is_storage(exc.cause):
            return 507
        if isinstance(exc.cause, (BadRequest, HubUnavailable)):  # found while running, but the request's mistake (a bad model file)
            return status_of(exc.cause)
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def _is_storage(cause: BaseException) -> bool:
    if isinstance(cause, StorageError):
        return True
    return getattr(cause, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)


def body_of(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, InvalidPrompt):
        return {"error": exc.error, "node_errors": exc.node_errors}
    if isinstance(exc, ExecutionFailed):
        return {"error": {"type": "execution_error", "message": str(exc), **exc.to_dict()}}
    if isinstance(exc, ExecutionInterrupted):
        return {"error": {"type": "execution_interrupted", "message": str(exc), "node_id": exc.node_id,
                          "class_type": exc.class_type}}
    kind = {400: "bad_request", 403: "forbidden", 404: "not_found", 413: "payload_too_large", 429: "queue_full",
            502: "bad_gateway", 503: "unavailable", 507: "storage_error"}.get(status_of(exc), "internal_error")
    return {"error": {"type": kind, "message": str(exc)}}


def error_response(exc: BaseException, retry_after_s: int = 5) -> Response:
    status = status_of(exc)
    headers = {}
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = str(retry_after_s)
    if isinstance(exc, Draining):
        headers["Retry-After"] = "1"
    if status >= 500:
        log.warning("answering %d: %s", status, exc)
    return JSONResponse(body_of(exc), status_code=status, headers=headers)


async def engine_error(request: Request, exc: Exception) -> Response:
    return error_response(exc, request.app.state.settings.retry_after_s)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": {"type": "http_error", "message": exc.detail}}, status_code=exc.status_code,
                        headers=exc.headers)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": {"type": "internal_error", "message": f"{type(exc).__name__}: {exc}"}},
                        status_code=500)


EXCEPTION_HANDLERS = {EngineError: engine_error, HTTPException: http_error, Exception: unexpected_error}
