from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image
from starlette.testclient import TestClient

from engine.registry import NodeRegistry, default_registry
from engine.settings import Settings
from handler.app import create_app
from tests import graph_nodes


@pytest.fixture
def registry() -> NodeRegistry:
    """The shipped nodes plus the test-only graph nodes."""
    registry = default_registry()
    registry.register_module("tests.graph_nodes")
    return registry


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", max_queue=8)


@pytest.fixture(autouse=True)
def _reset_graph_nodes() -> Iterator[None]:
    graph_nodes.CALLS.clear()
    graph_nodes.RELEASE.clear()
    yield
    graph_nodes.RELEASE.set()  # never leave an executor thread blocked in Wait


@pytest.fixture
def make_client(registry: NodeRegistry):
    """Factory: a TestClient (lifespan started) for given settings; closed at the end of the test."""
    clients: list[TestClient] = []

    def make(settings: Settings, **kwargs) -> TestClient:
        client = TestClient(create_app(settings, registry), **kwargs)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    graph_nodes.RELEASE.set()
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client, settings: Settings) -> TestClient:
    return make_client(settings)


def settings_with_checkpoints(tmp_path: Path, checkpoints: Path) -> Settings:
    """Settings whose models/checkpoints folder is a link to a folder of (tiny) checkpoints built once."""
    settings = Settings(data_dir=tmp_path / "data", max_queue=8)
    settings.models_dir.mkdir(parents=True)
    (settings.models_dir / "checkpoints").symlink_to(checkpoints, target_is_directory=True)
    return settings


def png_bytes(size=(8, 8), color=(255, 0, 0, 255), mode="RGBA") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode != "L" else color[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def add_input_image(settings: Settings, name: str = "in.png", **kwargs) -> Path:
    path = settings.input_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(**kwargs))
    return path


def invert_prompt(image: str = "in.png", prefix: str = "ComfyUI") -> dict:
    """The benchmark's model-free prompt: LoadImage -> ImageInvert -> SaveImage."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }
