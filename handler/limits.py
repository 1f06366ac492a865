"""Request body size limit, as pure ASGI middleware: a declared Content-Length over the limit is refused before
reading, and a streamed body is counted as it arrives."""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from handler.errors import PayloadTooLarge, error_response


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._error(int(declared)))(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error(received)
            return message

        await self.app(scope, counted, send)

    def _error(self, size: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body ({size} bytes or more) exceeds the limit of {self.max_bytes} "
                               "bytes; send a smaller body or raise --max-body-bytes")
