"""ComfyUI's model discovery routes: `GET /models` (the folder names) and `GET /models/{folder}` (the names a loader
of that folder accepts: local files plus the known-models registry)."""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.errors import NotFound
from engine.known_models import canonical_folder
from engine.modelfiles import ModelFiles
from handler.responses import JSONResponse


def _models(request: Request) -> ModelFiles:
    return request.app.state.executor.models


async def list_folders(request: Request) -> Response:
    return JSONResponse(_models(request).folder_names())


async def list_folder(request: Request) -> Response:
    models = _models(request)
    folder = request.path_params["folder"]
    if canonical_folder(folder) not in models.folder_names():
        raise NotFound(f"no model folder {folder!r}; GET /models lists them")
    return JSONResponse(await run_in_threadpool(models.list, folder))  # walks directories: off the event loop


ROUTES: list[Route] = [
    Route("/models", list_folders, methods=["GET"]),
    Route("/models/{folder}", list_folder, methods=["GET"]),
]
