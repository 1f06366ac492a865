"""The Starlette application factory: one route table, the error mapping, the body limit and the executor's
lifetime. Every route is also served under `/api`, as ComfyUI's own front end calls them."""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from engine.executor import Executor
from engine.imagestore import image_store_from_settings
from engine.registry import NodeRegistry, default_registry
from engine.settings import Settings
from engine import startup
from handler import comfy, files, free, health, metrics, models, prompts
from handler.errors import EXCEPTION_HANDLERS
from handler.events import EventHub, websocket_endpoint
from handler.limits import BodySizeLimit

log = logging.getLogger(__name__)

API_ROUTES: list[BaseRoute] = [
    Route("/api/v1/prompts", prompts.post_prompts, methods=["POST"]),
    Route("/api/v1/prompts", prompts.get_prompts, methods=["GET"]),
    Route("/api/v1/images/{digest}", prompts.get_image, methods=["GET"]),
]

COMFY_ROUTES: list[BaseRoute] = [
    Route("/", comfy.index, methods=["GET"]),
    Route("/prompt", comfy.get_prompt, methods=["GET"]),
    Route("/prompt", comfy.post_prompt, methods=["POST"]),
    Route("/queue", comfy.get_queue, methods=["GET"]),
    Route("/queue", comfy.post_queue, methods=["POST"]),
    Route("/interrupt", comfy.post_interrupt, methods=["POST"]),
    *free.ROUTES,
    *models.ROUTES,
    Route("/history", comfy.get_history, methods=["GET"]),
    Route("/history", comfy.post_history, methods=["POST"]),
    Route("/history/{prompt_id}", comfy.get_history_item, methods=["GET"]),
    Route("/object_info", comfy.get_object_info, methods=["GET"]),
    Route("/object_info/{node_class}", comfy.get_object_info_node, methods=["GET"]),
    Route("/embeddings", comfy.get_embeddings, methods=["GET"]),
    Route("/extensions", comfy.get_extensions, methods=["GET"]),
    Route("/system_stats", comfy.get_system_stats, methods=["GET"]),
    Route("/view", files.view, methods=["GET"]),
    Route("/upload/image", files.upload_image, methods=["POST"]),
    Route("/healthz", health.healthz, methods=["GET"]),
    Route("/readyz", health.readyz, methods=["GET"]),
    WebSocketRoute("/ws", websocket_endpoint),
]


def create_app(settings: Settings, registry: NodeRegistry | None = None) -> Starlette:
    """The service, with its executor started in `lifespan` and hung on `app.state`."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        executor = Executor(settings, registry or default_registry(), image_store_from_settings(settings))
        hub = EventHub(asyncio.get_running_loop())
        executor.add_listener(hub.publish)
        app.state.metrics = metrics.Metrics(executor)
        executor.start()
        # preload and warm-up run in the background: health checks answer meanwhile, /readyz says 503 until done
        readiness, stop_startup = startup.start(executor, settings)
        app.state.executor, app.state.hub, app.state.readiness = executor, hub, readiness
        app.state.started = True
        log.info("serving with data in %s", settings.data_dir.resolve())
        try:
            yield
        finally:
            stop_startup.set()
            await asyncio.to_thread(executor.stop)

    app = Starlette(
        routes=[*API_ROUTES, *COMFY_ROUTES, *metrics.ROUTES, Mount("/api", routes=COMFY_ROUTES)],
        middleware=[Middleware(metrics.RequestMetrics), Middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.started = False
    return app
