"""Response classes: JSON through orjson, PNG bytes."""
from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

import orjson
from starlette.responses import Response


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS, default=str)
        except TypeError:  # integers beyond 64 bits (seeds do that), which only the standard library writes
            return json.dumps(content, default=str, ensure_ascii=False).encode()


class PNGResponse(Response):
    media_type = "image/png"


def content_disposition(filename: str) -> str:
    """`filename=<name>` as the contract writes it; names outside printable ASCII (a non-ASCII SaveImage prefix)
    get an ASCII fallback plus RFC 5987's `filename*`, since header values must be Latin-1."""
    if re.fullmatch(r"[A-Za-z0-9._\-]+", filename):
        return f"filename={filename}"
    fallback = re.sub(r"[^A-Za-z0-9._\-]", "_", filename)
    return f"filename={fallback}; filename*=UTF-8''{quote(filename)}"
