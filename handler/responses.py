"""Response classes: JSON through orjson, PNG bytes."""
from __future__ import annotations

import json
from typing import Any

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
