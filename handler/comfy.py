"""ComfyUI's own routes, as thin shims over the executor: /prompt, /queue, /history, /interrupt, /object_info,
/embeddings, /extensions, /system_stats and the index page."""
from __future__ import annotations

from pathlib import PurePosixPath
from typing import Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from engine.errors import BadRequest, NotFound
from engine.system import system_stats
from engine.validation import problem
from handler.body import envelope, read_json
from handler.jobs import submit, validate
from handler.responses import JSONResponse

INDEX = """<!doctype html><html><head><meta charset="utf-8"><title>comfy-endpoint</title></head>
<body><h1>comfy-endpoint</h1><p>A stateless endpoint for ComfyUI API-format prompts.
POST a prompt to <code>/api/v1/prompts</code> and get the image back; ComfyUI's own routes
(<code>/prompt</code>, <code>/queue</code>, <code>/history</code>, <code>/object_info</code>, <code>/view</code>,
<code>/ws</code>) work as in ComfyUI. This server ships no graph editor.</p></body></html>"""


async def index(request: Request) -> Response:
    return HTMLResponse(INDEX)


async def get_prompt(request: Request) -> Response:
    return JSONResponse({"exec_info": {"queue_remaining": request.app.state.executor.remaining()}})


async def post_prompt(request: Request) -> Response:
    executor = request.app.state.executor
    data = await read_json(request)
    if not isinstance(data, dict) or "prompt" not in data:
        error = problem("no_prompt", "No prompt provided", "send {\"prompt\": {...}} (an API-format prompt)")
        return JSONResponse({"error": error, "node_errors": {}}, status_code=400)
    body = envelope(data)
    executor.check_admission()
    validated, staged = await validate(executor, body, strict=False)
    job, _ = submit(executor, body, validated, staged)
    return JSONResponse({"prompt_id": job.prompt_id, "number": job.number, "node_errors": validated.node_errors})


async def get_queue(request: Request) -> Response:
    queue = request.app.state.executor.queue
    running = queue.running
    return JSONResponse({
        "queue_running": [running.queue_tuple()] if running is not None else [],
        "queue_pending": [job.queue_tuple() for job in queue.pending()],
    })


async def post_queue(request: Request) -> Response:
    executor = request.app.state.executor
    await _clear_or_delete(request, executor.clear, executor.delete)
    return Response(status_code=200)


async def post_interrupt(request: Request) -> Response:
    data = await _optional_json(request)
    request.app.state.executor.interrupt(data.get("prompt_id"))
    return Response(status_code=200)


async def get_history(request: Request) -> Response:
    history = request.app.state.executor.history
    max_items = _int_param(request, "max_items")
    offset = _int_param(request, "offset")
    return JSONResponse(history.latest(max_items, -1 if offset is None else offset))


async def get_history_item(request: Request) -> Response:
    prompt_id = request.path_params["prompt_id"]
    entry = request.app.state.executor.history.get(prompt_id)
    return JSONResponse({prompt_id: entry} if entry is not None else {})


async def post_history(request: Request) -> Response:
    history = request.app.state.executor.history
    await _clear_or_delete(request, history.clear, history.delete)
    return Response(status_code=200)


async def get_object_info(request: Request) -> Response:
    executor = request.app.state.executor
    context = executor.context()

    def collect() -> dict:
        return {name: executor.registry.object_info(name, context) for name in executor.registry.classes}

    return JSONResponse(await run_in_threadpool(collect))


async def get_object_info_node(request: Request) -> Response:
    executor = request.app.state.executor
    name = request.path_params["node_class"]
    if name not in executor.registry:
        raise NotFound(f"no node class named {name!r}; GET /object_info lists them")
    info = await run_in_threadpool(executor.registry.object_info, name, executor.context())
    return JSONResponse({name: info})


async def get_embeddings(request: Request) -> Response:
    # every embeddings folder the text encoders search (extra_model_paths.yaml too), names without extension
    files = await run_in_threadpool(request.app.state.executor.models.list, "embeddings")
    return JSONResponse(sorted({PurePosixPath(name).with_suffix("").as_posix() for name in files}))


async def get_extensions(request: Request) -> Response:
    return JSONResponse([])  # no front-end extensions: this server ships no graph editor


async def get_system_stats(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(system_stats))


async def _optional_json(request: Request) -> dict:
    if not (await request.body()).strip():
        return {}
    data = await read_json(request)
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


async def _clear_or_delete(request: Request, clear: Callable[[], None],
                           delete: Callable[[list[str]], None]) -> None:
    """ComfyUI's `{"clear": true}` / `{"delete": [prompt_id, ...]}` bodies of POST /queue and POST /history."""
    data = await _optional_json(request)
    if data.get("clear"):
        clear()
    if "delete" in data:
        if not isinstance(data["delete"], list):
            raise BadRequest("delete must be a list of prompt ids")
        delete([str(item) for item in data["delete"]])


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw!r}") from None
