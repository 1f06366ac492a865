"""Reading request bodies: JSON (a bare prompt or a `{"prompt": ...}` envelope) or multipart with a `prompt`
part and file parts; every failure is a `BadRequest` that says what to send instead."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.datastructures import UploadFile
from starlette.requests import Request

from engine.errors import BadRequest
from handler.errors import UnsupportedMediaType

# ComfyUI reads /prompt bodies as JSON whatever their type, and its own example client (urllib without a header)
# sends application/x-www-form-urlencoded, so that type is read as JSON too.
JSON_TYPES = ("", "application/json", "text/plain", "application/x-www-form-urlencoded")
MAX_FILES = 64


@dataclass
class PromptRequest:
    prompt: Any
    extra_data: dict[str, Any] = field(default_factory=dict)
    client_id: str | None = None
    prompt_id: str | None = None
    number: float | None = None
    front: bool = False
    files: list[tuple[str, bytes]] = field(default_factory=list)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_json(body: bytes) -> Any:
    if not body.strip():
        raise BadRequest("the request body is empty; send the prompt as JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:  # the standard library also reads integers beyond 64 bits, which orjson refuses
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None


async def read_json(request: Request) -> Any:
    kind = media_type(request)
    if kind not in JSON_TYPES and not kind.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type {kind!r} is not accepted here; send application/json "
                                   "(with curl: -H 'Content-Type: application/json')")
    return parse_json(await request.body())


async def read_prompt_request(request: Request, allow_files: bool = True) -> PromptRequest:
    """The prompt and its envelope fields from JSON or (where allowed) multipart/form-data."""
    if allow_files and media_type(request) == "multipart/form-data":
        return await _read_multipart(request)
    return envelope(await read_json(request))


def envelope(data: Any) -> PromptRequest:
    """Accept `{"prompt": {...}, "client_id": ..., "extra_data": ...}` or the bare prompt itself."""
    if not (isinstance(data, dict) and _is_envelope(data)):
        return PromptRequest(prompt=data)
    extra_data = data.get("extra_data") or {}
    if not isinstance(extra_data, dict):
        raise BadRequest("extra_data must be an object")
    client_id = data.get("client_id")
    number = data.get("number")
    if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))):
        raise BadRequest("number must be a number")
    return PromptRequest(prompt=data.get("prompt"), extra_data=extra_data,
                         client_id=str(client_id) if client_id is not None else None,
                         prompt_id=str(data["prompt_id"]) if data.get("prompt_id") else None,
                         number=number, front=bool(data.get("front", False)))


def _is_envelope(data: dict[str, Any]) -> bool:
    inner = data.get("prompt")
    if "prompt" not in data:
        return False
    # a node whose id happens to be "prompt" has a class_type; an envelope's prompt does not
    return not (isinstance(inner, dict) and "class_type" in inner)


async def _read_multipart(request: Request) -> PromptRequest:
    limit = request.app.state.settings.max_body_bytes
    form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES, max_part_size=limit)
    prompt_part = form.get("prompt")
    if prompt_part is None:
        raise BadRequest("the multipart body has no part named 'prompt'; add one holding the prompt JSON")
    raw = await prompt_part.read() if isinstance(prompt_part, UploadFile) else prompt_part.encode()
    parsed = envelope(parse_json(raw))
    for name, part in form.multi_items():
        if name == "prompt" or not isinstance(part, UploadFile):
            continue
        if not part.filename:
            raise BadRequest(f"the file part {name!r} has no filename; the prompt refers to files by filename")
        parsed.files.append((part.filename, await part.read()))
    await form.close()
    return parsed


def prompt_digest(prompt: Any) -> str:
    """The API contract's digest: sha256 of `json.dumps(prompt, separators=(',', ':'))`, key order as received."""
    return hashlib.sha256(json.dumps(prompt, separators=(",", ":")).encode("utf-8")).hexdigest()
