"""Liveness and readiness for load balancers and orchestrators."""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from handler.responses import JSONResponse


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = request.app.state
    executor = state.executor
    if not getattr(state, "started", False):
        reason = "starting"
    elif not executor.accepting:
        reason = "draining"
    elif executor.queue.pending_count() >= state.settings.max_queue:
        reason = "queue_full"
    else:
        return JSONResponse({"status": "ready", "queue_remaining": executor.remaining()})
    return JSONResponse({"status": reason}, status_code=503)
