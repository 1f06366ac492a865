"""The shipped nodes against direct computations on small inputs, following ComfyUI's own nodes (nodes.py:
LoadImage, LoadImageMask, EmptyImage, ImageInvert, ImageBatch, SaveImage, PreviewImage; comfy/utils.py
common_upscale; folder_paths.get_save_image_path; comfy_extras/nodes_primitive.py), then end to end through the
HTTP app."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.context import NodeContext
from engine.errors import EngineError
from engine.folders import Folders
from nodes.image import EmptyImage, ImageBatch, ImageInvert, LoadImage, LoadImageMask
from nodes.output import PreviewImage, SaveImage
from nodes.primitives import (PrimitiveBoolean, PrimitiveFloat, PrimitiveInt, PrimitiveString,
                              PrimitiveStringMultiline)
from tests.conftest import add_input_image, invert_prompt

PNG = {"Accept": "image/png"}


# ---------------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def context(settings) -> NodeContext:
    folders = Folders(settings.input_dir, settings.output_dir, settings.temp_dir)
    folders.ensure()
    return NodeContext(folders)


def random_pixels(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def as_float(pixels) -> torch.Tensor:
    """What LoadImage must give for 8-bit pixels: value / 255 as float32."""
    return torch.from_numpy(np.asarray(pixels).astype(np.float32) / 255.0)


def as_uint8(image) -> np.ndarray:
    """ComfyUI's SaveImage conversion: clip(255 * x, 0, 255) truncated to uint8, in float32 as a tensor is."""
    values = np.asarray(image, dtype=np.float32)
    return np.clip(np.float32(255.0) * values, 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write(path: Path, image: Image.Image, fmt: str = "PNG", **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(image, fmt, **options))
    return path


def opened(source: Path | bytes) -> Image.Image:
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()
    return image


def load(context: NodeContext, name: str = "in.png") -> tuple[torch.Tensor, torch.Tensor]:
    image, mask = LoadImage().load_image(name, context)
    assert image.dtype == torch.float32 and mask.dtype == torch.float32
    return image, mask


def tree(root: Path) -> set[str]:
    """Every file and folder below `root`, as relative paths."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def assert_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same shape, dtype float32 and values, exactly."""
    torch.testing.assert_close(actual, expected.to(torch.float32), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- LoadImage


def test_load_image_rgb_is_pixels_over_255_with_a_64x64_empty_mask(context, settings):
    pixels = random_pixels(3, 5)
    write(settings.input_dir / "in.png", Image.fromarray(pixels, "RGB"))
    image, mask = load(context)
    assert_equal(image, as_float(pixels)[None])  # [1, H, W, 3]
    assert_equal(mask, torch.zeros(1, 64, 64))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_load_image_mask_is_one_minus_alpha(context, settings, mode):
    pixels = random_pixels(3, 4, channels=len(mode), seed=1)
    write(settings.input_dir / "in.png", Image.fromarray(pixels, mode))
    image, mask = load(context)
    colour = pixels[..., :3] if mode == "RGBA" else np.repeat(pixels[..., :1], 3, axis=-1)
    assert_equal(image, as_float(colour)[None])  # alpha is dropped from IMAGE
    assert_equal(mask, 1.0 - as_float(pixels[..., -1])[None])  # [1, H, W]


@pytest.mark.filterwarnings("ignore:Palette images with Transparency expressed in bytes")
@pytest.mark.parametrize("transparency, alphas", [(1, [255, 0, 255]), (bytes([0, 128, 255]), [0, 128, 255])],
                         ids=["one-transparent-index", "alpha-per-index"])
def test_load_image_palette_png_with_transparency(context, settings, transparency, alphas):
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.flatten().tolist())
    write(settings.input_dir / "in.png", image, transparency=transparency)
    image, mask = load(context)
    assert_equal(image, as_float(palette[indices])[None])
    assert_equal(mask, 1.0 - as_float(np.array(alphas, dtype=np.uint8)[indices])[None])


def test_load_image_animated_gif_is_a_batch_of_its_frames(context, settings):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (4, 3), colour) for colour in colours]
    write(settings.input_dir / "anim.gif", frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    image, mask = load(context, "anim.gif")
    assert_equal(image, as_float(np.array(colours, dtype=np.uint8)[:, None, None, :].repeat(3, 1).repeat(4, 2)))
    assert_equal(mask, torch.zeros(3, 64, 64))


def test_load_image_multipage_tiff_skips_pages_of_another_size(context, settings):
    pages = [random_pixels(3, 4, seed=s) for s in range(4)]
    pages[2] = random_pixels(5, 5, seed=9)  # differs from the first page's size: skipped
    first, *rest = (Image.fromarray(page, "RGB") for page in pages)
    write(settings.input_dir / "pages.tiff", first, "TIFF", save_all=True, append_images=rest)
    image, mask = load(context, "pages.tiff")
    assert_equal(image, as_float(np.stack([pages[0], pages[1], pages[3]])))
    assert mask.shape == (3, 64, 64)


def test_load_image_applies_exif_orientation(context, settings):
    stored = np.zeros((8, 16, 3), dtype=np.uint8)
    stored[:, :8] = 255  # left half white as stored; orientation 6 means "rotate 90 degrees clockwise to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    path = write(settings.input_dir / "photo.jpg", Image.fromarray(stored, "RGB"), "JPEG", exif=exif, quality=95)
    decoded = np.array(opened(path))  # the JPEG as stored, without the rotation
    image, _ = load(context, "photo.jpg")
    assert image.shape == (1, 16, 8, 3)
    assert_equal(image, as_float(np.rot90(decoded, k=-1).copy())[None])
    assert image[0, :8].mean() > 0.9 and image[0, 8:].mean() < 0.1  # the stored left side is now the top


def test_load_image_32bit_integer_image_is_scaled_by_1_over_255(context, settings):
    levels = np.arange(256, dtype=np.int32).reshape(16, 16)  # mode "I" values 255 * k come out as k / 255
    write(settings.input_dir / "deep.tiff", Image.fromarray(levels * 255, "I"), "TIFF")
    image, mask = load(context, "deep.tiff")
    assert_equal(image, as_float(np.repeat(levels[..., None], 3, axis=-1))[None])
    assert_equal(mask, torch.zeros(1, 64, 64))


def test_load_image_16bit_png_is_scaled_like_mode_i(context, settings):
    """ComfyUI's `i.mode == 'I'` branch exists for 16-bit files; recent Pillow opens a 16-bit greyscale PNG as
    "I;16", which must be scaled the same way rather than clipped to white above 255."""
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    path = write(settings.input_dir / "deep.png", Image.fromarray(levels * 255))
    assert opened(path).mode.startswith("I")
    image, _ = load(context, "deep.png")
    assert_equal(image, as_float(np.repeat(levels[..., None], 3, axis=-1))[None])


def test_is_changed_is_the_sha256_of_the_file_and_follows_its_content(context, settings):
    path = add_input_image(settings, color=(1, 2, 3, 255))
    first = LoadImage.IS_CHANGED("in.png", context)
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    assert LoadImageMask.IS_CHANGED("in.png", context) == first
    add_input_image(settings, color=(1, 2, 4, 255))
    assert LoadImage.IS_CHANGED("in.png", context) == hashlib.sha256(path.read_bytes()).hexdigest() != first


def test_validate_inputs_refuses_missing_files_and_names_outside_input(context, settings, tmp_path):
    add_input_image(settings)
    (tmp_path / "secret.png").write_bytes(encode(Image.new("RGB", (2, 2))))
    for node in (LoadImage, LoadImageMask):
        assert node.VALIDATE_INPUTS(image="in.png", context=context) is True
        for bad in ("missing.png", "../../secret.png", str(tmp_path / "secret.png")):
            message = node.VALIDATE_INPUTS(image=bad, context=context)
            assert isinstance(message, str) and message, bad


@pytest.mark.parametrize("kind", ["output", "temp"])
def test_annotated_name_reads_from_that_folder(context, settings, kind):
    add_input_image(settings, "x.png", color=(255, 0, 0, 255))
    other = getattr(settings, f"{kind}_dir")
    write(other / "x.png", Image.new("RGB", (2, 2), (0, 0, 255)))
    name = f"x.png [{kind}]"
    assert LoadImage.VALIDATE_INPUTS(image=name, context=context) is True
    image, _ = load(context, name)
    assert_equal(image, as_float(np.full((1, 2, 2, 3), (0, 0, 255), dtype=np.uint8)))
    assert LoadImage.IS_CHANGED(name, context) == hashlib.sha256((other / "x.png").read_bytes()).hexdigest()


def test_request_upload_wins_over_the_input_folder(context, settings, tmp_path):
    add_input_image(settings, "in.png", color=(255, 0, 0, 255))
    upload = write(tmp_path / "scratch" / "in.png", Image.new("RGB", (2, 2), (0, 255, 0)))
    only_uploaded = write(tmp_path / "scratch" / "new.png", Image.new("RGB", (2, 2), (0, 0, 255)))
    context.uploads.update({"in.png": upload, "new.png": only_uploaded})
    image, _ = load(context, "in.png")
    assert_equal(image, as_float(np.full((1, 2, 2, 3), (0, 255, 0), dtype=np.uint8)))
    assert LoadImage.IS_CHANGED("in.png", context) == hashlib.sha256(upload.read_bytes()).hexdigest()
    assert LoadImage.VALIDATE_INPUTS(image="new.png", context=context) is True
    mask = LoadImageMask().load_image("new.png", "blue", context)[0]
    assert_equal(mask, torch.ones(1, 2, 2))


def test_input_types_offer_the_images_in_input(context, settings):
    add_input_image(settings, "b.png")
    add_input_image(settings, "a.png")
    (settings.input_dir / "notes.txt").write_text("not an image")
    files, options = LoadImage.INPUT_TYPES(context)["required"]["image"]
    assert files == ["a.png", "b.png"] and options == {"image_upload": True}
    assert LoadImageMask.INPUT_TYPES(context)["required"]["image"][0] == files
    assert LoadImageMask.INPUT_TYPES(context)["required"]["channel"] == (["alpha", "red", "green", "blue"],)


# ---------------------------------------------------------------------------------------------------- LoadImageMask


@pytest.mark.parametrize("channel, index", [("alpha", 3), ("red", 0), ("green", 1), ("blue", 2)])
def test_load_image_mask_takes_one_channel_inverting_only_alpha(context, settings, channel, index):
    pixels = random_pixels(3, 4, channels=4, seed=2)
    write(settings.input_dir / "in.png", Image.fromarray(pixels, "RGBA"))
    (mask,) = LoadImageMask().load_image("in.png", channel, context)
    expected = as_float(pixels[..., index])[None]
    assert_equal(mask, 1.0 - expected if channel == "alpha" else expected)


@pytest.mark.parametrize("channel, level", [("alpha", 0), ("red", 10), ("blue", 30)])
def test_load_image_mask_of_an_rgb_image(context, settings, channel, level):
    write(settings.input_dir / "in.png", Image.new("RGB", (4, 3), (10, 20, 30)))
    (mask,) = LoadImageMask().load_image("in.png", channel, context)
    assert_equal(mask, as_float(np.full((1, 3, 4), level, dtype=np.uint8)))  # opaque: the alpha mask is zeros


# ---------------------------------------------------------------------------------------------------- generators


def test_empty_image_has_the_colour_in_every_pixel():
    (image,) = EmptyImage().generate(width=3, height=2, batch_size=4, color=0xFF8000)
    assert image.shape == (4, 2, 3, 3) and image.dtype == torch.float32
    assert_equal(image, torch.tensor([1.0, 128 / 255, 0.0]).expand(4, 2, 3, 3))


def test_image_invert_is_one_minus_x():
    image = torch.rand(2, 3, 4, 3, generator=torch.Generator().manual_seed(0))
    (inverted,) = ImageInvert().invert(image)
    assert_equal(inverted, 1.0 - image)


def test_image_batch_of_same_size_concatenates():
    first, second = torch.rand(1, 2, 3, 3), torch.rand(2, 2, 3, 3)
    (batch,) = ImageBatch().batch(first, second)
    assert_equal(batch, torch.cat([first, second]))


# The second batch is centre-cropped to the first's aspect ratio (4 x 6, aspect 1.5) and resized bilinearly. The
# crop boxes are worked out by hand from common_upscale: rows y..H-y or columns x..W-x, with x (or y) =
# round((old - old * aspect ratio quotient) / 2), Python's round (half to even).
@pytest.mark.parametrize("height, width, rows, cols", [
    (6, 5, slice(1, 5), slice(0, 5)),    # taller: y = round(1.33) = 1
    (4, 10, slice(0, 4), slice(2, 8)),   # wider: x = round(2.0) = 2
    (4, 11, slice(0, 4), slice(2, 9)),   # x = round(2.5) = 2, keeping 7 columns
    (2, 3, slice(0, 2), slice(0, 3)),    # same aspect ratio: no crop
])
def test_image_batch_resizes_the_second_batch_like_common_upscale(height, width, rows, cols):
    first = torch.rand(1, 4, 6, 3, generator=torch.Generator().manual_seed(1))
    second = torch.rand(2, height, width, 3, generator=torch.Generator().manual_seed(2))
    cropped = second[:, rows, cols, :].movedim(-1, 1)
    resized = torch.nn.functional.interpolate(cropped, size=(4, 6), mode="bilinear").movedim(1, -1)
    (batch,) = ImageBatch().batch(first, second)
    assert batch.shape == (3, 4, 6, 3)
    assert torch.equal(batch[:1], first)
    torch.testing.assert_close(batch[1:], resized, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rgba_first", [False, True])
def test_image_batch_pads_an_rgb_batch_with_opaque_alpha_to_join_an_rgba_one(rgba_first):
    """Current ComfyUI: when one batch has 4 channels and the other 3, the 3-channel one gains alpha 1.0."""
    rgb, rgba = torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 4)
    padded = torch.cat([rgb, torch.ones(1, 2, 3, 1)], dim=-1)
    (batch,) = ImageBatch().batch(*((rgba, rgb) if rgba_first else (rgb, rgba)))
    assert_equal(batch, torch.cat((rgba, padded) if rgba_first else (padded, rgba)))


# ---------------------------------------------------------------------------------------------------- SaveImage


def save(context: NodeContext, images: torch.Tensor | None = None, prefix: str = "ComfyUI", **hidden) -> list[dict]:
    images = torch.rand(1, 2, 3, 3) if images is None else images
    result = SaveImage().save_images(images, context, filename_prefix=prefix, **hidden)
    assert set(result) == {"ui"} and set(result["ui"]) == {"images"}
    return result["ui"]["images"]


def names(results: list[dict]) -> list[str]:
    return [entry["filename"] for entry in results]


def test_save_image_numbers_files_and_reports_them(context, settings):
    first, second = save(context), save(context)
    assert first == [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]
    assert second == [{"filename": "ComfyUI_00002_.png", "subfolder": "", "type": "output"}]
    assert tree(settings.output_dir) == {"ComfyUI_00001_.png", "ComfyUI_00002_.png"}


def test_save_image_counter_continues_past_existing_files_of_its_prefix_only(context, settings):
    for name in ("ComfyUI_00007_.png", "ComfyUI_00009.png", "ComfyUI_extra_00090_.png", "Other_00050_.png",
                 "Comfy_00060_.png"):
        (settings.output_dir / name).write_bytes(b"")
    assert names(save(context)) == ["ComfyUI_00008_.png"]
    assert names(save(context, prefix="Other")) == ["Other_00051_.png"]
    assert names(save(context, prefix="Fresh")) == ["Fresh_00001_.png"]


def test_save_image_counter_sees_files_written_since_the_last_save(context, settings):
    """get_save_image_path scans the folder on every save, so files another writer (a second replica on shared
    storage, a user copying files in) added meanwhile are counted past too."""
    assert names(save(context)) == ["ComfyUI_00001_.png"]
    (settings.output_dir / "ComfyUI_00007_.png").write_bytes(b"")
    assert names(save(context)) == ["ComfyUI_00008_.png"]


def test_save_image_counter_counts_files_of_any_extension(context, settings):
    """get_save_image_path looks at every `<prefix>_<digits>_...` file, so images share numbers with the
    animated WEBP/PNG and video files that ComfyUI's other savers write beside them."""
    (settings.output_dir / "ComfyUI_00004_.webp").write_bytes(b"")
    assert names(save(context)) == ["ComfyUI_00005_.png"]


def test_save_image_prefix_with_subfolders(context, settings):
    assert save(context, prefix="a/b/name") == [{"filename": "name_00001_.png", "subfolder": "a/b", "type": "output"}]
    assert (settings.output_dir / "a" / "b" / "name_00001_.png").is_file()
    assert save(context, prefix="a/b/name")[0]["filename"] == "name_00002_.png"


def test_save_image_substitutes_width_and_height(context, settings):
    results = save(context, torch.rand(1, 4, 6, 3), prefix="size_%width%x%height%")
    assert names(results) == ["size_6x4_00001_.png"]
    assert opened(settings.output_dir / "size_6x4_00001_.png").size == (6, 4)


def test_save_image_batch_writes_one_file_per_image_with_consecutive_counters(context, settings):
    batch = torch.rand(2, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    assert names(save(context, batch)) == ["ComfyUI_00001_.png", "ComfyUI_00002_.png"]
    for index, name in enumerate(["ComfyUI_00001_.png", "ComfyUI_00002_.png"]):
        assert np.array_equal(np.array(opened(settings.output_dir / name)), as_uint8(batch[index]))


def test_save_image_embeds_the_prompt_and_extra_pnginfo_as_json_text(context, settings):
    prompt = {"3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "é ünïcode"}}}
    extra = {"workflow": {"nodes": [1, 2], "links": []}, "note": "plain"}
    save(context, prompt=prompt, extra_pnginfo=extra)
    assert opened(settings.output_dir / "ComfyUI_00001_.png").text == {
        "prompt": json.dumps(prompt), "workflow": json.dumps(extra["workflow"]), "note": json.dumps("plain")}
    save(context)
    assert opened(settings.output_dir / "ComfyUI_00002_.png").text == {}


def test_save_image_pixels_are_clipped_and_truncated(context, settings):
    values = torch.tensor([[0.5, 0.999, 1.2], [-0.3, 0.0, 1.0]])
    save(context, values[None, ..., None].expand(1, 2, 3, 3))
    stored = np.array(opened(settings.output_dir / "ComfyUI_00001_.png"))
    assert stored.shape == (2, 3, 3)
    assert stored[..., 0].tolist() == [[127, 254, 255], [0, 0, 255]]


def test_save_image_keeps_alpha_of_a_four_channel_image(context, settings):
    rgba = as_float(random_pixels(2, 3, channels=4, seed=4))[None]
    save(context, rgba)
    stored = opened(settings.output_dir / "ComfyUI_00001_.png")
    assert stored.mode == "RGBA"
    assert np.array_equal(np.array(stored), as_uint8(rgba[0]))


@pytest.mark.parametrize("prefix", ["../evil", "a/../../evil", "{outside}/x", "link/x"])
def test_save_image_refuses_a_prefix_outside_the_output_folder(context, settings, tmp_path, prefix):
    outside = tmp_path / "outside"
    outside.mkdir()
    (settings.output_dir / "link").symlink_to(outside, target_is_directory=True)
    prefix = prefix.format(outside=outside)
    before = tree(tmp_path)
    message = SaveImage.VALIDATE_INPUTS(context=context, filename_prefix=prefix)
    assert isinstance(message, str) and message
    with pytest.raises(EngineError):
        save(context, prefix=prefix)
    assert tree(tmp_path) == before


def test_save_image_leaves_no_temporary_files(context, settings):
    save(context, torch.rand(3, 2, 2, 3), prefix="sub/img")
    save(context, torch.rand(1, 2, 2, 3), prefix="sub/img")
    assert sorted(tree(settings.output_dir)) == ["sub", "sub/img_00001_.png", "sub/img_00002_.png",
                                                 "sub/img_00003_.png", "sub/img_00004_.png"]
    assert not any(name.startswith(".") for name in os.listdir(settings.output_dir / "sub"))


def test_preview_image_writes_to_temp(context, settings):
    image = torch.rand(1, 2, 3, 3)
    results = PreviewImage().save_images(image, context, prompt={"1": {}})["ui"]["images"]
    assert len(results) == 1
    entry = results[0]
    assert re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", entry["filename"])
    assert entry["subfolder"] == "" and entry["type"] == "temp"
    assert np.array_equal(np.array(opened(settings.temp_dir / entry["filename"])), as_uint8(image[0]))
    assert tree(settings.output_dir) == set()
    assert "filename_prefix" not in PreviewImage.INPUT_TYPES()["required"]


# ---------------------------------------------------------------------------------------------------- primitives

PRIMITIVES = {
    "PrimitiveString": (PrimitiveString, "STRING", {}, "String", "some text"),
    "PrimitiveStringMultiline": (PrimitiveStringMultiline, "STRING", {"multiline": True}, "String (Multiline)",
                                 "line 1\nline 2"),
    "PrimitiveInt": (PrimitiveInt, "INT", {"min": -sys.maxsize, "max": sys.maxsize, "control_after_generate": True},
                     "Int", -7),
    "PrimitiveFloat": (PrimitiveFloat, "FLOAT", {"min": -sys.maxsize, "max": sys.maxsize}, "Float", 2.5),
    "PrimitiveBoolean": (PrimitiveBoolean, "BOOLEAN", {}, "Boolean", True),
}


@pytest.mark.parametrize("name", PRIMITIVES)
def test_primitive_outputs_its_value(name):
    cls, *_, value = PRIMITIVES[name]
    assert getattr(cls(), cls.FUNCTION)(value=value) == (value,)


@pytest.mark.parametrize("name", PRIMITIVES)
def test_primitive_object_info(client, name):
    _, kind, options, display, _ = PRIMITIVES[name]
    response = client.get(f"/object_info/{name}")
    assert response.status_code == 200, response.text
    info = response.json()[name]
    assert info["input"] == {"required": {"value": [kind, options]}}
    assert info["output"] == [kind] and info["output_name"] == [kind] and info["output_is_list"] == [False]
    assert (info["display_name"], info["category"], info["output_node"]) == (display, "utils/primitive", False)


# ---------------------------------------------------------------------------------------------------- over HTTP


def post_png(client, **kwargs) -> np.ndarray:
    response = client.post("/api/v1/prompts", headers=PNG, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("image/png")
    return np.array(opened(response.content))


def inverted(pixels: np.ndarray) -> np.ndarray:
    """LoadImage -> ImageInvert -> SaveImage computed directly: 1 - p / 255 in float32, saved by truncation."""
    return as_uint8(np.float32(1.0) - pixels.astype(np.float32) / np.float32(255.0))


def test_http_invert_prompt_returns_the_inverted_png(client, settings):
    pixels = random_pixels(3, 5, seed=5)
    write(settings.input_dir / "in.png", Image.fromarray(pixels, "RGB"))
    returned = post_png(client, json=invert_prompt())
    assert np.array_equal(returned, inverted(pixels))
    assert np.abs(returned.astype(int) - (255 - pixels.astype(int))).max() <= 1
    saved = opened(settings.output_dir / "ComfyUI_00001_.png")
    assert np.array_equal(np.array(saved), returned)
    assert json.loads(saved.text["prompt"]) == invert_prompt()


def test_http_multipart_file_wins_over_a_same_named_input_file(client, settings):
    old_pixels, new_pixels = random_pixels(3, 5, seed=6), random_pixels(3, 5, seed=7)
    old = write(settings.input_dir / "in.png", Image.fromarray(old_pixels, "RGB")).read_bytes()
    assert np.array_equal(post_png(client, json=invert_prompt()), inverted(old_pixels))  # caches the old run

    new = encode(Image.fromarray(new_pixels, "RGB"))
    returned = post_png(client, data={"prompt": json.dumps(invert_prompt())},
                        files={"image": ("in.png", new, "image/png")})
    assert np.array_equal(returned, inverted(new_pixels))
    assert sorted(os.listdir(settings.input_dir)) == ["in (1).png", "in.png"]
    assert (settings.input_dir / "in.png").read_bytes() == old
    assert (settings.input_dir / "in (1).png").read_bytes() == new


def test_http_primitives_feed_empty_image_and_save_image(client, settings):
    prompt = {
        "1": {"class_type": "PrimitiveInt", "inputs": {"value": 5}},
        "2": {"class_type": "PrimitiveInt", "inputs": {"value": 0x102030}},
        "3": {"class_type": "PrimitiveString", "inputs": {"value": "prims/out"}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": ["1", 0], "height": 3, "batch_size": 1,
                                                      "color": ["2", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": ["3", 0]}},
    }
    returned = post_png(client, json=prompt)
    colour = np.array([0x10 / 0xFF, 0x20 / 0xFF, 0x30 / 0xFF], dtype=np.float32)
    assert np.array_equal(returned, as_uint8(np.broadcast_to(colour, (3, 5, 3))))
    assert (settings.output_dir / "prims" / "out_00001_.png").is_file()
