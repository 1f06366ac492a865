"""Weight patches (LoRA and its relatives) applied in place to a resident network, and undone bit for bit.

A patched model never gets its own copy of the weights. A MODEL or CLIP handle carries the patch sets that its
LoraLoader nodes added (`PatchSet`: a target network and (parameter, patch, strength) entries); right before the
network runs, `patched(modules, patch_sets)` writes the patched values into the parameters themselves, so the
sampling loop runs the plain network at the plain speed (nothing is wrapped, nothing recomputed per step).

Numerics, as ComfyUI's ModelPatcher (`patch_weight_to_device` with `comfy.lora.calculate_weight`): each patched
parameter is copied to float32 on its own device, every patch aimed at it is added in order in float32, and the
result is rounded once to the parameter's dtype (or first to `PatchSet.round_to`, the dtype ComfyUI stores that
network in when ours holds it wider). The original values of exactly the patched parameters are copied to the
backup device (the CPU, ComfyUI's offload device) and copied back unchanged when the weights are restored.

When weights are patched and restored (the patch state lives on the module object, with the weights it describes):
- `patched` with the sets already applied does nothing: the next prompt with the same LoRA costs nothing;
- `patched` with different sets (others, more, fewer, other strengths, or none at all) restores the originals,
  then applies the new sets; two prompts with different LoRAs on one checkpoint are right in either order;
- patches stay applied when the block ends, until different ones are wanted or `unpatch(modules)` restores them
  (call it before the weights are saved, copied elsewhere or replaced);
- asking for different sets while a `patched` block over the same module is still open is a `PatchConflict`:
  the weights cannot hold two things at once.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from engine.errors import EngineError

# ComfyUI keeps the backup of a patched weight on its offload device, the CPU, so that a patched model costs no
# extra accelerator memory.
DEFAULT_BACKUP_DEVICE = torch.device("cpu")
_STATE = "_weight_patch_state"


class PatchError(EngineError):
    """A patch set does not fit the network it is applied to (unknown target or parameter)."""


class PatchConflict(EngineError):
    """Different patches were asked for while the module is in use with the ones applied."""


class WeightPatch(ABC):
    """A change to one weight tensor. Equality is identity: two patches are the same only if they are one object."""

    @abstractmethod
    def update(self, weight: Tensor, strength: float) -> Tensor:
        """The patched weight from `weight`, a float32 working copy on the parameter's device that this may change
        in place; returns float32."""

    def apply(self, weight: Tensor, strength: float) -> Tensor:
        """The patched `weight`, computed in float32 and cast back to the weight's dtype."""
        return self.update(weight.detach().to(torch.float32, copy=True), strength).to(weight.dtype)


@dataclass(frozen=True)
class PatchSet:
    target: str  # "unet", "text0", "text1" (index of the text model in the checkpoint's order)
    entries: tuple[tuple[str, WeightPatch, float], ...]  # (parameter name in the target module, patch, strength)
    round_to: torch.dtype | None = None  # round the patched weight through this dtype (how ComfyUI stores it)

    def __len__(self) -> int:
        return len(self.entries)


@dataclass
class _PatchState:
    applied: tuple[PatchSet, ...] = ()
    backup: dict[str, Tensor] = field(default_factory=dict)  # original values of the patched parameters
    users: int = 0  # open `patched` blocks
    lock: threading.Lock = field(default_factory=threading.Lock)


def applied_patches(module: nn.Module) -> tuple[PatchSet, ...]:
    """The patch sets currently written into `module`'s weights."""
    state = module.__dict__.get(_STATE)
    return state.applied if state is not None else ()


@contextmanager
def patched(modules: Mapping[str, nn.Module], patch_sets: Sequence[PatchSet], *,
            backup_device: torch.device | None = None) -> Iterator[Mapping[str, nn.Module]]:
    """Run the block with `patch_sets` applied to `modules` (target name -> module); a module named by no set runs
    unpatched. See the module docstring for when weights are applied and restored."""
    wanted = _sets_by_target(modules, patch_sets)
    entered: list[_PatchState] = []
    try:
        for target, module in modules.items():
            state = _state(module)
            with state.lock:
                if state.applied != wanted[target]:
                    if state.users:
                        raise PatchConflict(f"the {target} network is in use with other patches; "
                                            "finish that block before asking for different ones")
                    _restore(module, state)
                    _apply(module, state, wanted[target], backup_device or DEFAULT_BACKUP_DEVICE)
                state.users += 1
            entered.append(state)
        yield modules
    finally:
        for state in entered:
            with state.lock:
                state.users -= 1


def unpatch(modules: Mapping[str, nn.Module] | Sequence[nn.Module]) -> None:
    """Restore the original weights of every module (a no-op for modules without patches)."""
    for module in modules.values() if isinstance(modules, Mapping) else modules:
        state = module.__dict__.get(_STATE)
        if state is None:
            continue
        with state.lock:
            if state.users:
                raise PatchConflict("cannot restore the weights of a network while a patched block uses it")
            _restore(module, state)


def _sets_by_target(modules: Mapping[str, nn.Module],
                    patch_sets: Sequence[PatchSet]) -> dict[str, tuple[PatchSet, ...]]:
    unknown = sorted({s.target for s in patch_sets} - set(modules))
    if unknown:
        raise PatchError(f"patches for {', '.join(unknown)} but the networks given are {', '.join(modules)}")
    return {target: tuple(s for s in patch_sets if s.target == target) for target in modules}


def _state(module: nn.Module) -> _PatchState:
    state = module.__dict__.get(_STATE)
    if state is None:
        state = _PatchState()
        module.__dict__[_STATE] = state  # a plain attribute: not a parameter, buffer or submodule
    return state


def _apply(module: nn.Module, state: _PatchState, patch_sets: tuple[PatchSet, ...],
           backup_device: torch.device) -> None:
    if not patch_sets:
        return
    params = dict(module.named_parameters())
    plan: dict[str, list[tuple[WeightPatch, float]]] = {}
    for patch_set in patch_sets:
        for name, patch, strength in patch_set.entries:
            if name not in params:
                raise PatchError(f"the {patch_set.target} network has no parameter {name!r}")
            plan.setdefault(name, []).append((patch, strength))
    round_to = next((s.round_to for s in patch_sets if s.round_to is not None), None)
    try:
        with torch.no_grad():
            for name, patches in plan.items():
                param = params[name]
                state.backup[name] = param.detach().to(backup_device, copy=True)
                weight = param.detach().to(torch.float32, copy=True)
                for patch, strength in patches:
                    weight = patch.update(weight, strength)
                if round_to is not None:
                    weight = weight.to(round_to)
                param.copy_(weight)
    except BaseException:
        _restore(module, state)  # never leave a half-patched network behind
        raise
    state.applied = patch_sets


def _restore(module: nn.Module, state: _PatchState) -> None:
    if state.backup:
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, original in state.backup.items():
                params[name].copy_(original)
    state.backup.clear()
    state.applied = ()
