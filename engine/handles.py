"""What MODEL, CLIP and VAE handles share: reaching a resident network with its patches applied, and the VAE
handle itself (the MODEL handle is `engine.diffusion.DiffusionModel`, the CLIP handle
`engine.text.handle.ClipHandle`).

A handle is immutable and cheap: it names a resident network (`engine.residency.Resident`), never holds the
weights itself, and carries the patches (LoRA) later nodes added. Nodes reach the network where they need it:

    with model.active() as unet: ...        with clip.active() as encoder: ...        with vae.active() as ae: ...

`active()` loads the network when it is not resident (it may have been evicted since the handle was made), pins
it for the block, and applies the handle's patches in place through `engine.patching.patched`, which also takes
off the patches another handle left on the same weights.
"""
from __future__ import annotations

import threading
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from engine.models.vae import AutoencoderKL, VAEConfig
from engine.patching import PatchSet, patched
from engine.residency import Resident


class ActiveSlot:
    """The network a handle has active on this thread (inside `active()`), so per-step calls skip the cache."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> Any:
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else None

    @contextmanager
    def bind(self, value: Any) -> Iterator[Any]:
        stack = self._local.__dict__.setdefault("stack", [])
        stack.append(value)
        try:
            yield value
        finally:
            stack.pop()


@contextmanager
def activate(slot: ActiveSlot, resident: Resident, targets: Callable[[Any], Mapping[str, nn.Module]],
             patches: tuple[PatchSet, ...]) -> Iterator[Any]:
    """What every handle's `active()` does: reuse the network already active on this thread, or load and pin the
    resident network, apply `patches` to its `targets(network)` modules, and make it the active one."""
    current = slot.get()
    if current is not None:
        yield current
        return
    with resident.use() as network, patched(targets(network), patches), slot.bind(network):
        yield network


@dataclass(frozen=True, eq=False)
class VAEHandle:
    """The VAE a prompt passes between nodes. Also usable where an `AutoencoderKL` is expected (encode, decode,
    device, dtype, ...): each call then makes the network active for its duration."""

    resident: Resident  # value: AutoencoderKL; an AutoencoderKL itself is accepted and kept as it is
    _active: ActiveSlot = field(default_factory=ActiveSlot, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.resident, nn.Module):
            object.__setattr__(self, "resident", Resident.fixed(self.resident, [self.resident], "vae"))

    def active(self) -> AbstractContextManager[AutoencoderKL]:
        """The VAE, loaded and pinned for the duration of the block (a VAE takes no patches)."""
        return activate(self._active, self.resident, lambda vae: {}, ())

    @property
    def device(self) -> torch.device:
        return self.resident.device

    @property
    def dtype(self) -> torch.dtype:
        return self.resident.dtype

    @property
    def config(self) -> VAEConfig:
        with self.active() as vae:
            return vae.config

    @property
    def downscale_factor(self) -> int:
        with self.active() as vae:
            return vae.downscale_factor

    @property
    def latent_channels(self) -> int:
        with self.active() as vae:
            return vae.latent_channels

    def encode(self, x: Tensor) -> Tensor:
        with self.active() as vae:
            return vae.encode(x)

    def decode(self, z: Tensor) -> Tensor:
        with self.active() as vae:
            return vae.decode(z)
