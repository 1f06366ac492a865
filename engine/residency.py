"""Models resident on the device between prompts, within a memory budget, evicted least-recently-used.

The executor owns one `ModelCache`. Loaders do not hold networks themselves: they describe how to load one (a
`Resident`: the file, the kind of network, its dtype and device, and a load function) and hand that to MODEL /
CLIP / VAE handles. A handle asks the cache for the network right where it is needed (`with cache.use(resident)`),
which loads it when it is not resident, pins it while in use and marks it recently used. Two prompts naming the
same file share one load, because entries are keyed by (resolved path, kind, dtype, device).

When a load would take the resident total over the budget, the least recently used entries not in use are
evicted first: their parameters move to the `meta` device (so that nothing, not even a stale reference, keeps
their memory) and, on CUDA, the allocator's cache is emptied. A handle whose network was evicted loads it again
on its next use. A network in use is never evicted; one asked to go while in use (`unload_all`) goes when its
last user is done.

The budget (`memory_budget_mb`, 0 = automatic; see `default_budget`):
- CUDA: the device's total memory minus a reserve for activations, the larger of 2 GiB and 15% of the total
  (SDXL at 1024x1024 needs about 1-2 GiB for UNet activations and more for a VAE decode, which falls back to
  tiles when short of memory).
- CPU: half of the memory this process may use (physical RAM, or the cgroup limit of a container when lower);
  the other half is left for activations, decoded images and the operating system.
Sizes are measured from the loaded parameters and buffers; a load is preceded by an estimate (from the file's
header) so that room is made before the weights arrive, which matters on a GPU.

Events (through the `events` callable, the executor's `emit`): "model_load" {folder, name, bytes, seconds} after
each load, "model_evict" {name, bytes} after each eviction.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from engine.settings import Settings

log = logging.getLogger(__name__)

EventFn = Callable[[str, dict[str, Any]], None]
Loader = Callable[[], "tuple[Any, Sequence[nn.Module]]"]  # -> (value handed to users, the modules that hold it)

GIB = 1024 ** 3
CUDA_RESERVE_MIN = 2 * GIB  # activations of one SDXL step at 1024x1024 fit with room to spare
CUDA_RESERVE_SHARE = 0.15
CPU_SHARE = 0.5


@dataclass(frozen=True)
class ModelKey:
    path: str  # the resolved file path
    kind: str  # which network of the file: unet, text, vae, ...
    dtype: torch.dtype
    device: torch.device

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass(frozen=True, eq=False)
class Resident:
    """How to reach one resident network, and to load it again after an eviction.

    `cache` is None for a fixed network that no cache manages (built directly, e.g. by a test): `use` then yields
    `value` as it is."""
    cache: ModelCache | None
    key: ModelKey
    load: Loader | None = None
    folder: str = ""  # the model folder the file came from, for events
    estimate: int = 0  # bytes expected once loaded, to make room before loading (0: unknown)
    value: Any = None  # the fixed network when `cache` is None

    @classmethod
    def fixed(cls, value: Any, modules: Sequence[nn.Module], kind: str) -> Resident:
        tensor = next((t for m in modules for t in m.parameters()), torch.empty(0))
        key = ModelKey(f"<in memory {kind} {id(value):x}>", kind, tensor.dtype, tensor.device)
        return cls(None, key, value=value)

    @property
    def device(self) -> torch.device:
        return self.key.device

    @property
    def dtype(self) -> torch.dtype:
        return self.key.dtype

    @contextmanager
    def use(self) -> Iterator[Any]:
        """The network, loaded and pinned for the duration of the block."""
        if self.cache is None:
            yield self.value
            return
        with self.cache.use(self) as value:
            yield value

    def ensure_loaded(self) -> None:
        if self.cache is not None:
            self.cache.load(self)


@dataclass(eq=False)
class _Entry:
    value: Any
    modules: tuple[nn.Module, ...]
    bytes: int
    folder: str
    pins: int = 0
    doomed: bool = False  # asked to go while in use: evicted when the last user is done


@dataclass
class _Released:
    name: str
    bytes: int
    modules: tuple[nn.Module, ...] = field(default=())


class ModelCache:
    """Resident networks within `budget_bytes` on `device`, least recently used evicted first. Thread-safe."""

    def __init__(self, budget_bytes: int, device: torch.device, events: EventFn | None = None):
        self.budget_bytes = budget_bytes
        self.device = torch.device(device)
        self._events = events
        self._entries: OrderedDict[ModelKey, _Entry] = OrderedDict()  # least recently used first
        self._used = 0
        self._lock = threading.Lock()  # guards the entries and the total; never held while loading
        self._loading: dict[ModelKey, threading.Lock] = {}  # one load per key at a time

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device, events: EventFn | None = None) -> ModelCache:
        mib = settings.memory_budget_mb
        budget = mib * 1024 * 1024 if mib > 0 else default_budget(device)
        log.info("resident models: budget %.0f MiB on %s", budget / 2 ** 20, device)
        return cls(budget, device, events)

    # -- what handles call --------------------------------------------------------------------------------------
    def resident(self, key: ModelKey, load: Loader, *, folder: str = "", estimate: int = 0) -> Resident:
        return Resident(self, key, load, folder, estimate)

    @contextmanager
    def use(self, resident: Resident) -> Iterator[Any]:
        entry = self._acquire(resident)
        try:
            yield entry.value
        finally:
            self._unpin(resident.key, entry)

    def load(self, resident: Resident) -> None:
        """Make the network resident without keeping it pinned (preload, loader nodes)."""
        self._unpin(resident.key, self._acquire(resident))

    # -- state --------------------------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self._used

    def is_resident(self, key: ModelKey) -> bool:
        with self._lock:
            return key in self._entries

    def entries(self) -> list[dict[str, Any]]:
        """What is resident, least recently used first (for logs and /system_stats-like reports)."""
        with self._lock:
            return [{"name": k.name, "kind": k.kind, "bytes": e.bytes, "in_use": e.pins > 0}
                    for k, e in self._entries.items()]

    # -- freeing ------------------------------------------------------------------------------------------------
    def unload_all(self) -> int:
        """Evict every network (those in use as soon as their users are done); the bytes freed now."""
        released = []
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.pins:
                    entry.doomed = True
                else:
                    released.append(self._remove(key))
        self._release(released)
        return sum(r.bytes for r in released)

    def free_memory(self) -> int:
        """`unload_all`, then hand unreferenced memory back (garbage collection, the CUDA allocator's cache)."""
        freed = self.unload_all()
        gc.collect()
        _empty_device_cache(self.device)
        return freed

    # -- internals ----------------------------------------------------------------------------------------------
    def _acquire(self, resident: Resident) -> _Entry:
        key = resident.key
        entry = self._pin(key)
        if entry is not None:
            return entry
        with self._lock:
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            entry = self._pin(key)  # another thread may have loaded it while this one waited
            if entry is not None:
                return entry
            with self._lock:
                victims = self._make_room(resident.estimate)
            self._release(victims)
            entry = self._load(resident)
            with self._lock:
                self._entries[key] = entry
                self._used += entry.bytes
                victims = self._make_room(0, keep=key)
                over = self._used > self.budget_bytes
            self._release(victims)
        if over:
            log.warning("resident models take %.0f MiB, over the budget of %.0f MiB: those in use cannot be "
                        "evicted (raise memory_budget_mb or use smaller models)", self._used / 2 ** 20,
                        self.budget_bytes / 2 ** 20)
        return entry

    def _pin(self, key: ModelKey) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.pins += 1
                self._entries.move_to_end(key)
            return entry

    def _unpin(self, key: ModelKey, entry: _Entry) -> None:
        released = []
        with self._lock:
            entry.pins -= 1
            if entry.doomed and entry.pins == 0 and self._entries.get(key) is entry:
                released.append(self._remove(key))
            if self._used > self.budget_bytes:  # over budget while models were in use: back under it now
                released += self._make_room(0)
        self._release(released)

    def _load(self, resident: Resident) -> _Entry:
        if resident.load is None:
            raise ValueError(f"no way to load {resident.key.name}")
        started = time.perf_counter()
        value, modules = resident.load()
        modules = tuple(modules)
        size = measure(modules)
        seconds = time.perf_counter() - started
        entry = _Entry(value, modules, size, resident.folder, pins=1)
        log.info("loaded %s %s (%.1f MiB) in %.2f s", resident.key.name, resident.key.kind, size / 2 ** 20, seconds)
        self._emit("model_load", {"folder": resident.folder, "name": resident.key.name, "bytes": size,
                                  "seconds": seconds})
        return entry

    def _make_room(self, needed: int, keep: ModelKey | None = None) -> list[_Released]:
        """Under the lock: remove least recently used entries not in use until `needed` more bytes fit."""
        released = []
        for key, entry in list(self._entries.items()):
            if self._used + needed <= self.budget_bytes:
                break
            if entry.pins == 0 and key != keep:
                released.append(self._remove(key))
        return released

    def _remove(self, key: ModelKey) -> _Released:
        entry = self._entries.pop(key)
        self._used -= entry.bytes
        modules, entry.modules, entry.value = entry.modules, (), None
        return _Released(key.name, entry.bytes, modules)

    def _release(self, released: list[_Released]) -> None:
        """Outside the lock: free the evicted networks' memory and report them."""
        if not released:
            return
        for item in released:
            for module in item.modules:
                module.to(device="meta")  # drops the weights even if a stale reference to the module survives
            item.modules = ()
            log.info("evicted %s (%.1f MiB)", item.name, item.bytes / 2 ** 20)
            self._emit("model_evict", {"name": item.name, "bytes": item.bytes})
        _empty_device_cache(self.device)

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        if self._events is not None:
            self._events(event, data)


def measure(modules: Sequence[nn.Module]) -> int:
    """Bytes held by the modules' parameters and buffers (each tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen and tensor.device.type != "meta":
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def default_budget(device: torch.device) -> int:
    """The automatic budget: see the module docstring."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return max(0, total - max(CUDA_RESERVE_MIN, int(total * CUDA_RESERVE_SHARE)))
    return int(usable_ram() * CPU_SHARE)


def usable_ram() -> int:
    """Physical RAM, or the container's cgroup memory limit when that is lower."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = min(ram, int(text))
    return ram


def _empty_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
