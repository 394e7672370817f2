"""What a recompute must replay or leave alone: RNG, autocast, running statistics.

Note [Exactly once]
A reversible backward runs every F and G a second time. To be the same function as
the forward, that second run must draw the same random numbers (dropout, drop-path),
run under the same autocast state, and must not count as another step for stateful
layers: BatchNorm running statistics and any other buffer a layer mutates are updated
by the forward only.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

Key = Hashable


@dataclass(frozen=True)
class RngState:
    """Generator states before one call: the CPU one and one per CUDA device."""

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...]


def cuda_devices(tensors: Iterable[object]) -> tuple[int, ...]:
    """CUDA device indices of the given tensors, in first-seen order."""
    seen: dict[int, None] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            seen[t.get_device()] = None
    return tuple(seen)


class RngTape:
    """Records the generator state before each random call, to replay it later.

    A call that draws no random numbers leaves no state on the tape, so a deterministic
    stage keeps nothing; a random call keeps one CPU state (about 5 KB) and 16 bytes per
    CUDA device.
    """

    def __init__(self, devices: tuple[int, ...]) -> None:
        self.devices = devices
        self.states: dict[Key, RngState] = {}

    def _capture(self) -> RngState:
        return RngState(
            torch.get_rng_state(),
            tuple(torch.cuda.get_rng_state(d) for d in self.devices),
        )

    def record(self, key: Key, fn: Callable[..., Any], *args: Any) -> Any:
        before = self._capture()
        out = fn(*args)
        after = self._capture()
        drew = not torch.equal(before.cpu, after.cpu) or any(
            not torch.equal(b, a) for b, a in zip(before.cuda, after.cuda, strict=True)
        )
        if drew:
            self.states[key] = before
        return out

    def replay(self, key: Key, fn: Callable[..., Any], *args: Any) -> Any:
        state = self.states.get(key)
        if state is not None:
            torch.set_rng_state(state.cpu)
            for device, s in zip(self.devices, state.cuda, strict=True):
                torch.cuda.set_rng_state(s, device)
        return fn(*args)

    @contextmanager
    def restoring(self) -> Iterator[None]:
        """Put the generators back as they were once replay is done."""
        if not self.states:
            yield
            return
        with torch.random.fork_rng(devices=list(self.devices)):
            yield


@dataclass(frozen=True)
class AutocastState:
    """The autocast settings in force for the CPU and one accelerator device type."""

    device_type: str
    device_kwargs: dict[str, Any] | None
    cpu_kwargs: dict[str, Any]

    @staticmethod
    def capture(device_type: str) -> AutocastState:
        def kwargs(dev: str) -> dict[str, Any]:
            return {
                "enabled": torch.is_autocast_enabled(dev),
                "dtype": torch.get_autocast_dtype(dev),
                "cache_enabled": torch.is_autocast_cache_enabled(),
            }

        device_kwargs = None
        if device_type != "cpu" and torch.amp.is_autocast_available(device_type):
            device_kwargs = kwargs(device_type)
        return AutocastState(device_type, device_kwargs, kwargs("cpu"))

    @contextmanager
    def restored(self) -> Iterator[None]:
        with ExitStack() as stack:
            if self.device_kwargs is not None:
                stack.enter_context(
                    torch.autocast(self.device_type, **self.device_kwargs)
                )
            stack.enter_context(torch.autocast("cpu", **self.cpu_kwargs))
            yield


def _tracking_norms(module: nn.Module) -> list[_NormBase]:
    return [
        m
        for m in module.modules()
        if isinstance(m, _NormBase) and m.training and m.track_running_stats
    ]


def mutable_buffers(module: nn.Module) -> list[torch.Tensor]:
    """Buffers a forward may update in place, other than running statistics."""
    norms = {
        id(b) for m in module.modules() if isinstance(m, _NormBase) for b in m.buffers()
    }
    return [b for b in module.buffers() if id(b) not in norms]


@contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm-style layers in train mode use batch statistics without updating the
    running ones (or `num_batches_tracked`): the recompute is not another step."""
    norms = _tracking_norms(module)
    # In train mode `track_running_stats=False` means: normalise with batch statistics
    # and pass no running buffers to F.batch_norm, which is the forward's arithmetic.
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


@contextmanager
def buffers_restored(buffers: list[torch.Tensor]) -> Iterator[None]:
    """Undo in-place updates to `buffers` made inside the block."""
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved, strict=True):
                b.copy_(s)
