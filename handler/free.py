"""ComfyUI's `POST /free`: `{"unload_models": true}` unloads every resident model, `{"free_memory": true}` also
drops the node-output cache and hands unused memory back (garbage collection, the CUDA allocator's cache).

Either flag unloads every model, as in ComfyUI (its worker reads `unload_models` with `free_memory` as the
default, and its handler records `unload_models` only when true). ComfyUI acts between prompts; this acts at
once, except that a model the running prompt is using goes when the prompt is done with it. The answer is an
empty 200.
"""
from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.errors import BadRequest
from handler.body import parse_json


async def post_free(request: Request) -> Response:
    body = await request.body()
    data = parse_json(body) if body.strip() else {}
    if not isinstance(data, dict):
        raise BadRequest('the body must be a JSON object such as {"unload_models": true, "free_memory": true}')
    unload_models, free_memory = bool(data.get("unload_models", False)), bool(data.get("free_memory", False))
    executor = request.app.state.executor
    if free_memory:
        executor.cache.clear()  # ComfyUI resets its executor's caches: cached outputs hold model handles
        await asyncio.to_thread(executor.resident.free_memory)
    elif unload_models:
        await asyncio.to_thread(executor.resident.unload_all)
    return Response(status_code=200)


ROUTES = [Route("/free", post_free, methods=["POST"])]
