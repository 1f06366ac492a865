"""The API routes: `POST /api/v1/prompts` runs a prompt and answers with its image, `GET /api/v1/prompts` gives
the last prompt, `GET /api/v1/images/{digest}` the stored image of a digest."""
from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from engine.errors import NotFound
from engine.imagestore import StoredImage, is_digest
from handler.body import prompt_digest, read_prompt_request
from handler.jobs import submit, validate
from handler.responses import JSONResponse, PNGResponse, content_disposition


async def post_prompts(request: Request) -> Response:
    executor = request.app.state.executor
    body = await read_prompt_request(request)
    digest = prompt_digest(body.prompt)
    as_png = wants_png(request.headers.get("accept", ""))
    reuse = not body.files and "no-cache" not in request.headers.get("cache-control", "").lower()
    if reuse:
        stored = await run_in_threadpool(executor.store.get, digest)
        if stored is not None:
            return image_response(request, stored, digest, as_png)
    executor.check_admission()
    validated, staged = await validate(executor, body, strict=True)  # this route runs all of a prompt or none
    job, outcome_future = submit(executor, body, validated, staged, digest=digest)
    outcome = await outcome_future
    if outcome.error is not None:
        raise outcome.error
    if outcome.primary is None:
        return Response(status_code=204, headers={"Digest": f"SHA256={digest}"})
    return image_response(request, outcome.primary, digest, as_png, {"prompt_id": job.prompt_id,
                                                                     "outputs": outcome.outputs})


async def get_prompts(request: Request) -> Response:
    last = request.app.state.executor.last_prompt
    if last is None:
        raise NotFound("no prompt has run yet")
    return JSONResponse(last)


async def get_image(request: Request) -> Response:
    digest = request.path_params["digest"].lower()
    if not is_digest(digest):
        raise NotFound("an image digest is 64 hexadecimal characters (the sha256 of the prompt)")
    stored = await run_in_threadpool(request.app.state.executor.store.get, digest)
    if stored is None:
        raise NotFound(f"no image is stored under {digest}")
    return PNGResponse(stored.data, headers=_image_headers(stored, digest))


def image_response(request: Request, stored: StoredImage, digest: str, as_png: bool,
                   extra: dict[str, Any] | None = None) -> Response:
    headers = _image_headers(stored, digest)
    if as_png:
        return PNGResponse(stored.data, headers=headers)
    return JSONResponse({"urls": [headers["Location"], view_url(request, stored.meta)], **(extra or {})},
                        headers=headers)


def _image_headers(stored: StoredImage, digest: str) -> dict[str, str]:
    return {
        "Location": f"/api/v1/images/{digest}",
        "Digest": f"SHA256={digest}",
        "Content-Disposition": content_disposition(stored.filename),
    }


def view_url(request: Request, meta: dict[str, Any]) -> str:
    query = {"filename": meta.get("filename", ""), "subfolder": meta.get("subfolder", ""),
             "type": meta.get("type", "output")}
    if not query["subfolder"]:
        del query["subfolder"]
    return f"{request.base_url}view?{urlencode(query)}"


def wants_png(accept: str) -> bool:
    """True when the client prefers `image/png` (or `image/*`) to JSON in its Accept header."""
    weights: dict[str, float] = {}
    for item in accept.split(","):
        kind, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    quality = float(param[2:])
                except ValueError:
                    quality = 0.0
        weights[kind.lower()] = max(weights.get(kind.lower(), 0.0), quality)
    png = max(weights.get("image/png", 0.0), weights.get("image/*", 0.0))
    json_ = max(weights.get("application/json", 0.0), weights.get("application/*", 0.0))
    return png > 0 and png >= json_
