"""/view and /upload/image: ComfyUI's parameters, no overwriting, and nothing outside the data folders."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.conftest import png_bytes


def upload(client, data, name="pic.png", **fields):
    return client.post("/upload/image", files={"image": (name, data, "image/png")},
                       data={k: str(v) for k, v in fields.items()})


def test_upload_never_overwrites(client, settings):
    first, second = png_bytes(color=(1, 2, 3, 255)), png_bytes(color=(4, 5, 6, 255))
    assert upload(client, first).json() == {"name": "pic.png", "subfolder": "", "type": "input"}
    assert upload(client, second).json()["name"] == "pic (1).png"
    assert upload(client, first).json()["name"] == "pic.png"  # same content: same name, nothing new
    assert upload(client, second).json()["name"] == "pic (1).png"
    assert (settings.input_dir / "pic.png").read_bytes() == first
    assert sorted(p.name for p in settings.input_dir.iterdir()) == ["pic (1).png", "pic.png"]


def test_upload_overwrite_when_asked(client, settings):
    upload(client, png_bytes(color=(1, 2, 3, 255)))
    replacement = png_bytes(color=(9, 9, 9, 255))
    assert upload(client, replacement, overwrite="true").json()["name"] == "pic.png"
    assert (settings.input_dir / "pic.png").read_bytes() == replacement


def test_upload_into_subfolder_and_temp(client, settings):
    assert upload(client, png_bytes(), subfolder="a/b").json() == {"name": "pic.png", "subfolder": "a/b",
                                                                    "type": "input"}
    assert (settings.input_dir / "a" / "b" / "pic.png").is_file()
    assert upload(client, png_bytes(), type="temp").json()["type"] == "temp"
    assert (settings.temp_dir / "pic.png").is_file()


@pytest.mark.parametrize("name, fields", [
    ("../escape.png", {}),
    ("pic.png", {"subfolder": "../.."}),
    ("pic.png", {"subfolder": "/etc"}),
    ("pic.png", {"subfolder": "a/../../x"}),
])
def test_upload_outside_the_folder_is_refused(client, settings, name, fields):
    r = upload(client, png_bytes(), name=name, **fields)
    assert r.status_code in (400, 403)
    assert "error" in r.json()
    assert not (settings.data_dir / "escape.png").exists()
    assert not list(settings.data_dir.glob("*.png"))


def test_upload_errors(client):
    assert client.post("/upload/image", data={"type": "input"}).status_code == 400
    assert upload(client, png_bytes(), type="models").status_code == 400


def test_view_serves_output_input_and_temp(client, settings):
    upload(client, png_bytes(color=(7, 8, 9, 255)), subfolder="s")
    r = client.get("/view", params={"filename": "pic.png", "type": "input", "subfolder": "s"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.content == (settings.input_dir / "s" / "pic.png").read_bytes()


def test_view_channels(client):
    upload(client, png_bytes(color=(10, 20, 30, 40)), type="output")
    rgb = Image.open(io.BytesIO(client.get("/view", params={"filename": "pic.png", "channel": "rgb"}).content))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (10, 20, 30)
    alpha = Image.open(io.BytesIO(client.get("/view", params={"filename": "pic.png", "channel": "a"}).content))
    assert alpha.mode == "RGBA" and alpha.getpixel((0, 0))[3] == 40


@pytest.mark.parametrize("params, status", [
    ({}, 400),
    ({"filename": "x.png", "type": "models"}, 400),
    ({"filename": "x.png", "channel": "cmyk"}, 400),
    ({"filename": "missing.png"}, 404),
    ({"filename": "../../etc/passwd"}, 403),
    ({"filename": "passwd", "subfolder": "../../../../etc"}, 403),
    ({"filename": "passwd", "subfolder": "/etc"}, 403),
    ({"filename": "x\x00.png"}, 400),
])
def test_view_errors(client, params, status):
    r = client.get("/view", params=params)
    assert r.status_code == status
    assert r.json()["error"]["message"]


def test_view_does_not_follow_symlinks_out(client, settings, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    (settings.output_dir / "link.png").symlink_to(secret)
    (settings.output_dir / "dir").symlink_to(tmp_path)
    assert client.get("/view", params={"filename": "link.png"}).status_code == 403
    assert client.get("/view", params={"filename": "secret.png", "subfolder": "dir"}).status_code == 403


def test_embeddings_lists_names_without_extension(client, settings):
    folder = settings.models_dir / "embeddings"
    folder.mkdir(parents=True)
    (folder / "EasyNegative.safetensors").write_bytes(b"x")
    (folder / "style.pt").write_bytes(b"x")
    assert client.get("/embeddings").json() == ["EasyNegative", "style"]
