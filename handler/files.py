"""`/view` and `/upload/image`, with ComfyUI's parameters; every path goes through `Folders.resolve`."""
from __future__ import annotations

import io
import mimetypes

from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from engine.errors import BadRequest, NotFound
from engine.executor import Executor
from engine.outputstore import relative_key
from engine.uploads import save_upload
from handler.responses import JSONResponse, PNGResponse, content_disposition

CHANNELS = ("rgba", "rgb", "a")


async def view(request: Request) -> Response:
    """A file of this replica's folders, else (with a shared store) the copy another replica published."""
    executor = request.app.state.executor
    params = request.query_params
    filename = params.get("filename")
    if not filename:
        raise BadRequest("the filename query parameter is required")
    channel = params.get("channel", "rgba")
    if channel not in CHANNELS:
        raise BadRequest(f"channel must be one of {', '.join(CHANNELS)}, got {channel!r}")
    kind, subfolder = params.get("type", "output"), params.get("subfolder", "")
    path = executor.folders.resolve(kind, subfolder, filename)  # refuses names outside the folders
    disposition = {"Content-Disposition": content_disposition(path.name)}
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if path.is_file():
        if channel == "rgba":
            return FileResponse(path, media_type=media, headers=disposition)
        data = await run_in_threadpool(path.read_bytes)
    else:
        data = await _shared_copy(executor, kind, subfolder, filename)
        if data is None:
            raise NotFound(f"no file {filename!r} in {kind}/{subfolder}")
        if channel == "rgba":
            return Response(data, media_type=media, headers=disposition)
    return PNGResponse(await run_in_threadpool(_channel_png, data, channel), headers=disposition)


async def _shared_copy(executor: Executor, kind: str, subfolder: str, filename: str) -> bytes | None:
    shared = executor.output_store  # None without a shared store
    if shared is None:
        return None
    try:
        relative_key(kind, subfolder, filename)
    except ValueError:  # a name the folders accept but no publisher writes (such as `a/../b`)
        return None
    return await run_in_threadpool(shared.fetch, kind, subfolder, filename)


def _channel_png(data: bytes, channel: str) -> bytes:
    """The colour channels alone (`rgb`), or the alpha channel alone as an image's alpha (`a`), as PNG."""
    with Image.open(io.BytesIO(data)) as image:
        if channel == "rgb":
            out = image.convert("RGB")
        else:
            alpha = image.convert("RGBA").getchannel("A")
            out = Image.new("RGBA", image.size)
            out.putalpha(alpha)
        buffer = io.BytesIO()
        out.save(buffer, format="PNG")
    return buffer.getvalue()


async def upload_image(request: Request) -> Response:
    folders = request.app.state.executor.folders
    form = await request.form(max_files=1, max_part_size=request.app.state.settings.max_body_bytes)
    image = form.get("image")
    if not isinstance(image, UploadFile):
        raise BadRequest("the multipart body has no file part named 'image'")
    if not image.filename:
        raise BadRequest("the image part has no filename")
    kind = str(form.get("type") or "input")
    subfolder = str(form.get("subfolder") or "")
    overwrite = str(form.get("overwrite", "")).lower() in ("true", "1")
    data = await image.read()
    await form.close()
    name = await run_in_threadpool(save_upload, folders, kind, subfolder, image.filename, data, overwrite)
    return JSONResponse({"name": name, "subfolder": subfolder, "type": kind})
