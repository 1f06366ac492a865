"""Reading `.safetensors` files through a memory map, without a copy of the weights in between.

Each tensor is a view of the mapped file (copy-on-write, never written), so a float32 file loaded to the CPU in
float32 costs no copy at all, and any conversion (dtype, device) reads each tensor exactly once. The pages of a
tensor are handed back to the kernel as soon as the next one is asked for: a converting load then peaks at the
converted weights plus one tensor, not at the converted weights plus the whole file. (The data stays valid: a
released page of an unmodified private mapping is simply read from the file again if touched.)
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Iterator, Mapping

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class WeightFileError(ValueError):
    """The file is not a well-formed safetensors file."""


class WeightFile(Mapping[str, torch.Tensor]):
    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._entries, self._data_start = _read_header(self._map, path.name)
        self._last: tuple[int, int] | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        self._release_last()
        start = self._data_start + begin
        count = (end - begin) // dtype.itemsize
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        self._last = (start, end - begin)
        return torch.frombuffer(self._map, dtype=dtype, count=count, offset=start).view(shape)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def meta(self) -> dict[str, torch.Tensor]:
        """Shape-only tensors of every entry, for detecting a model without reading its weights."""
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape, _b, _e) in self._entries.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def release(self) -> None:
        """Hand every page back to the kernel (after a network has been built from this file)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)
        self._last = None

    def _release_last(self) -> None:
        if self._last is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, length = self._last
        page = mmap.PAGESIZE
        first = -(-start // page) * page  # only whole pages inside the tensor: neighbours may share the edges
        last = (start + length) // page * page
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
        self._last = None


def _read_header(buffer: mmap.mmap, name: str) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], int]:
    if len(buffer) < 8:
        raise WeightFileError(f"{name} is too short to be a safetensors file")
    (size,) = struct.unpack("<Q", buffer[:8])
    if size > len(buffer) - 8:
        raise WeightFileError(f"{name} has a header of {size} bytes but only {len(buffer) - 8} follow")
    try:
        header = json.loads(buffer[8:8 + size])
    except ValueError as exc:
        raise WeightFileError(f"{name} has no readable safetensors header: {exc}") from None
    data_start, data_size = 8 + size, len(buffer) - 8 - size
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise WeightFileError(f"{name}: tensor {key} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        expected = dtype.itemsize
        for dim in shape:
            expected *= dim
        if not 0 <= begin <= end <= data_size or end - begin != expected:
            raise WeightFileError(f"{name}: tensor {key} lies outside the file or has the wrong size "
                                  "(a truncated download?)")
        entries[key] = (dtype, shape, begin, end)
    return entries, data_start
