"""Liveness and readiness for load balancers and orchestrators.

`/healthz` answers 200 while the process serves HTTP, start-up work included. `/readyz` answers 200 only when a
prompt sent now would be taken: 503 with the reason while starting, preloading models or warming up (or after
either failed, with the error), while draining, and while the queue is at its limit.
"""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from handler.responses import JSONResponse


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = request.app.state
    if not getattr(state, "started", False):
        return JSONResponse({"status": "starting"}, status_code=503)
    executor = state.executor
    readiness = getattr(state, "readiness", None)
    if not executor.accepting:
        body = {"status": "draining"}
    elif readiness is not None and not readiness.state.ready:
        body = readiness.state.to_dict()
    elif executor.queue.pending_count() >= state.settings.max_queue:
        body = {"status": "queue_full"}
    else:
        return JSONResponse({"status": "ready", "queue_remaining": executor.remaining()})
    return JSONResponse(body, status_code=503)
