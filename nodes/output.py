"""Output nodes: SaveImage writes PNGs to the output folder (with the prompt embedded), PreviewImage to temp."""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from engine.context import NodeContext
from engine.images import encode_png, to_pil
from engine.outputstore import OutputStore
from engine.savefiles import check_prefix, numbered_name, prompt_metadata, split_prefix, write_numbered

PNG = ".png"


class SaveImage:
    CATEGORY = "image"
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    DESCRIPTION = "Saves the input images to the output folder."
    folder_type = "output"
    compress_level = 4

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "ComfyUI"}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "context": "CONTEXT"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, context: NodeContext, filename_prefix: str = "ComfyUI"):
        return check_prefix(context.folders.output, filename_prefix)

    def save_images(self, images: torch.Tensor, context: NodeContext, filename_prefix: str = "ComfyUI",
                    prompt: dict | None = None, extra_pnginfo: dict | None = None):
        return {"ui": {"images": self.write(images, context, filename_prefix, prompt, extra_pnginfo)}}

    def write(self, batch: torch.Tensor, context: NodeContext, filename_prefix: str, prompt: dict | None,
              extra_pnginfo: dict | None) -> list[dict[str, str]]:
        base = context.folders.by_type(self.folder_type)
        prefix = _expand(filename_prefix, width=batch.shape[2], height=batch.shape[1])
        folder, subfolder, name = split_prefix(base, prefix)
        text = prompt_metadata(prompt, extra_pnginfo)
        counter = context.file_numbers.take(folder, name, len(batch))
        shared = context.output_store  # contexts built without a shared store have none
        results = []
        for batch_number, image in enumerate(batch):
            data = encode_png(to_pil(image), text, self.compress_level)
            stem = name.replace("%batch_num%", str(batch_number))
            counter = write_numbered(folder, stem, counter, PNG, data)
            if shared is not None:
                counter = self._publish(shared, folder, subfolder, stem, counter, data)
            results.append({"filename": numbered_name(stem, counter, PNG), "subfolder": subfolder,
                            "type": self.folder_type})
            counter += 1
        context.file_numbers.written(folder, name, counter - 1)
        return results

    def _publish(self, shared: OutputStore, folder: Path, subfolder: str, stem: str, counter: int,
                 data: bytes) -> int:
        """Publish the file just written as number `counter` to the shared store; when another replica already
        holds that name, move the local file to the first number free in both places. Returns the number used."""
        while not shared.publish(self.folder_type, subfolder, numbered_name(stem, counter, PNG), data):
            taken = folder / numbered_name(stem, counter, PNG)
            counter = write_numbered(folder, stem, max(counter, shared.highest_number(self.folder_type, subfolder,
                                                                                       stem)) + 1, PNG, data)
            taken.unlink(missing_ok=True)
        return counter


class PreviewImage(SaveImage):
    DESCRIPTION = "Saves the input images to the temp folder, for viewing."
    folder_type = "temp"
    compress_level = 1

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"images": ("IMAGE",)},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "context": "CONTEXT"},
        }

    def save_images(self, images: torch.Tensor, context: NodeContext, prompt: dict | None = None,
                    extra_pnginfo: dict | None = None):
        suffix = "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
        return {"ui": {"images": self.write(images, context, f"ComfyUI_temp_{suffix}", prompt, extra_pnginfo)}}


def _expand(prefix: str, width: int, height: int) -> str:
    """ComfyUI's prefix variables: %width%, %height%, %year%, %month%, %day%, %hour%, %minute%, %second%."""
    if "%" not in prefix:
        return prefix
    now = time.localtime()
    values = {"width": width, "height": height, "year": now.tm_year, "month": f"{now.tm_mon:02}",
              "day": f"{now.tm_mday:02}", "hour": f"{now.tm_hour:02}", "minute": f"{now.tm_min:02}",
              "second": f"{now.tm_sec:02}"}
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", str(value))
    return prefix


NODE_CLASS_MAPPINGS = {"SaveImage": SaveImage, "PreviewImage": PreviewImage}
NODE_DISPLAY_NAME_MAPPINGS = {"SaveImage": "Save Image", "PreviewImage": "Preview Image"}
