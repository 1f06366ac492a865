"""`/ws`: ComfyUI's websocket progress messages, routed to the client that queued each prompt.

The executor calls `publish` from its own thread; each connection has a queue drained by one sender task, so
messages reach a client in the order they were emitted."""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import orjson
from starlette.websockets import WebSocket

log = logging.getLogger(__name__)
INTERNAL_EVENTS = frozenset({"model_download", "model_load", "model_evict"})  # for metrics, not for clients


class EventHub:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.clients: dict[str, asyncio.Queue[bytes]] = {}

    def publish(self, event: str, data: dict[str, Any], client_id: str | None = None) -> None:
        """Thread-safe: send to `client_id`, or to every client when it is None (as ComfyUI does)."""
        if not self.clients or event in INTERNAL_EVENTS:  # nobody listens / not for clients (model names)
            return
        message = orjson.dumps({"type": event, "data": data}, default=str)
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._deliver, message, client_id)

    def _deliver(self, message: bytes, client_id: str | None) -> None:
        targets = self.clients.values() if client_id is None else filter(None, [self.clients.get(client_id)])
        for queue in targets:
            queue.put_nowait(message)

    async def serve(self, websocket: WebSocket, remaining: int) -> None:
        client_id = websocket.query_params.get("clientId") or uuid.uuid4().hex
        await websocket.accept()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.clients[client_id] = queue
        status = {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": client_id}
        queue.put_nowait(orjson.dumps({"type": "status", "data": status}))
        sender = asyncio.create_task(self._send(websocket, queue))
        try:
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass  # ComfyUI clients send nothing that matters; reading notices the disconnect
        finally:
            sender.cancel()
            if self.clients.get(client_id) is queue:
                del self.clients[client_id]

    async def _send(self, websocket: WebSocket, queue: asyncio.Queue[bytes]) -> None:
        try:
            while True:
                await websocket.send_text((await queue.get()).decode())
        except Exception:  # the socket closed; the reader side cleans up
            return


async def websocket_endpoint(websocket: WebSocket) -> None:
    await websocket.app.state.hub.serve(websocket, websocket.app.state.executor.remaining())
