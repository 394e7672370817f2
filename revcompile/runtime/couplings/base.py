"""The coupling protocol every reversible family implements, and its shared helpers.

A family is one `Coupling` subclass. `ReversibleStage` drives any of them through the
same few methods, so the exactly-once machinery (RNG and autocast replay, frozen
running statistics), the float64 stream, FSDP2 and torch.compile support and the drift
guard are written once, in stage.py and function.py:

    state = Family.enter(x, layout)                   # stage input -> 1 or 2 tensors
    state = coupling.step(state, context, call)       # differentiable: storing mode
    y = Family.leave(state, x, layout)                # state -> stage output

    carry = Family.open(state, couplings)             # the reversible forward ...
    aux = coupling.forward_step(carry, context, call) # ... on the representation that
    coupling.inverse_step(carry, aux, context, call)  #     the inverse undoes exactly
    coupling.backward_step(carry, aux, context, wrt_context, call, grads)

`call(key, module, stream, *context)` runs a branch; the stage hands each coupling one
that casts the stream to the compute dtype and records or replays RNG state under
``(coupling index, key)``. Entry and exit maps are linear (split, join, copy, sum), so
their gradients (`enter_grad`, `leave_grad`) need no values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from revcompile.errors import ConversionError

State = tuple[Tensor, ...]
Aux = tuple[Tensor, ...]  # what one coupling's forward_step saves for its backward

# `call(key, module, *args)` runs `module(*args)`; the stage passes one that records or
# replays RNG state under `key` (see Note [Exactly once] in state.py).
Call = Callable[..., Tensor]

# `recorder(key, module, *args)` likewise, with the coupling index in the key.
Recorder = Callable[..., Tensor] | None


class Unrebuildable(Exception):
    """Raised by a backward step that cannot rebuild its input (a fixed-point solve
    that did not converge); the stage then re-anchors on its saved input."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ReconstructionWarning(RuntimeWarning):
    """A reversible stage rebuilt its input with more error than its tolerance, or is
    configured so that it will (see the message for the numbers and the fix)."""


def plain_call(key: str, module: nn.Module, *args: Any) -> Tensor:
    return module(*args)


def keyed_call(
    recorder: Recorder, index: int, compute: torch.dtype | None = None
) -> Call:
    """A `Call` that hands ``((index, key), module, half, *args)`` to `recorder`,
    first casting the stream half to `compute` (Note [Float64 stream] in stage.py)."""

    def call(key: str, module: nn.Module, half: Tensor, *args: Any) -> Tensor:
        if compute is not None:
            half = half.to(compute)
        if recorder is None:
            return module(half, *args)
        return recorder((index, key), module, half, *args)

    return call


# Relative reconstruction tolerance per compute dtype: a few hundred ulps per coupling
# is rounding; more means a branch is not the same function twice.
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The least precise of `dtypes` and the active autocast dtype."""
    found = list(dtypes)
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            found.append(torch.get_autocast_dtype(device))
    return max(found, key=lambda d: torch.finfo(d).eps)


@dataclass(frozen=True)
class Layout:
    """Where a splitting family cuts the stream: `dim` and the two sizes."""

    dim: int
    sizes: tuple[int, int] | None = None  # None: the family keeps the full width

    def split(self, x: Tensor) -> State:
        # (B, C, ...) -> (B, c1, ...), (B, c2, ...): views, never copies of x.
        assert self.sizes is not None
        return tuple(torch.split(x, list(self.sizes), dim=self.dim))

    def join(self, state: Sequence[Tensor]) -> Tensor:
        return torch.cat(list(state), dim=self.dim)


class Carry:
    """The reversible representation of the state between couplings, and in backward
    the gradient with respect to the (float) state.

    Note [Rebuild in place]
    Reconstruction writes each coupling's input over its output (``y2 -= G(y1)``) and
    each gradient over the one it extends, so backward holds one generation of the
    tensors rather than two: at C=64, 32x32, batch 32 this took the peak of an additive
    stage from 72 to 64 MiB (benchmarks/stage.py). Only tensors the backward allocated
    itself are written: the saved stage output may still be held by the caller, and
    the incoming gradient belongs to autograd; the first write to each entry copies.
    """

    def __init__(
        self,
        values: Sequence[Tensor],
        grads: Sequence[Tensor] = (),
        meta: Any = None,
    ) -> None:
        self.values = list(values)
        self.grads = list(grads)
        self.meta = meta  # family bookkeeping (exact.py: the integer arithmetic)
        self._owned_values = [False] * len(self.values)
        self._owned_grads = [False] * len(self.grads)

    def start_backward(self, grads: Sequence[Tensor]) -> None:
        """The gradients reaching the final state; autograd's, so never written."""
        self.grads = list(grads)
        self._owned_grads = [False] * len(self.grads)

    def add(self, i: int, delta: Tensor, subtract: bool = False) -> None:
        """``values[i] += delta`` (or ``-=``), in place if this backward owns it.

        A family scales `delta` itself, in the same dtype as its forward did, so that
        the rebuilt value is the forward's bit for bit (Note [Float64 stream])."""
        self.values[i] = _add(self.values, self._owned_values, i, delta, subtract)

    def add_grad(self, i: int, delta: Tensor | None) -> None:
        """``grads[i] += delta``, in place if this backward owns it."""
        if delta is not None:
            self.grads[i] = _add(self.grads, self._owned_grads, i, delta, False)

    def scale_grad(self, i: int, factor: float) -> None:
        if factor == 1.0:
            return
        if self._owned_grads[i]:
            self.grads[i].mul_(factor)
        else:
            self.grads[i] = self.grads[i] * factor
            self._owned_grads[i] = True

    def swap(self) -> None:
        """Exchange the two entries (and their gradients): ``(a, b) -> (b, a)``."""
        self.values.reverse()
        self._owned_values.reverse()
        self.grads.reverse()
        self._owned_grads.reverse()


def _add(
    tensors: list[Tensor], owned: list[bool], i: int, delta: Tensor, subtract: bool
) -> Tensor:
    value = tensors[i]
    if owned[i] and value.shape == torch.broadcast_shapes(value.shape, delta.shape):
        return value.sub_(delta) if subtract else value.add_(delta)
    owned[i] = True
    return value - delta if subtract else value + delta


class Coupling(nn.Module):
    """One reversible step; a family is a subclass (see the module docstring).

    The defaults below are those of a family whose reversible representation is its
    float state and whose forward step is `step` itself; a family overrides what it
    does differently. `splits` says whether the state is the stage input's two channel
    halves (F and G branches) or full-width streams (each branch is a block's own f).
    """

    family: ClassVar[str]
    splits: ClassVar[bool]
    # Whether a stage of this family saves its input by default (the drift guard,
    # Note [Drift guard] in guard.py): only where reconstruction may fail outright.
    guard_default: ClassVar[bool] = False

    # --- entry and exit maps (linear) ---
    @classmethod
    def enter(cls, x: Tensor, layout: Layout) -> State:
        raise NotImplementedError

    @classmethod
    def enter_grad(cls, grads: Sequence[Tensor], layout: Layout) -> Tensor:
        raise NotImplementedError

    @classmethod
    def leave(cls, state: State, x: Tensor, layout: Layout) -> Tensor:
        raise NotImplementedError

    @classmethod
    def leave_grad(
        cls, dy: Tensor, layout: Layout
    ) -> tuple[list[Tensor], Tensor | None]:
        """Gradients of the exit map: ``(d state, d x)``, the second for an exit that
        reads the stage input itself (twin's ``x1 + x2 - x``), else None."""
        raise NotImplementedError

    # --- the reversible representation ---
    @classmethod
    def open(cls, state: State, couplings: Sequence[Coupling]) -> Carry:
        """The representation the reversible forward carries, at the stage input."""
        return Carry(state)

    @classmethod
    def decode(cls, carry: Carry) -> State:
        """The float state a representation stands for."""
        return tuple(carry.values)

    @classmethod
    def pack(cls, carry: Carry, y: Tensor, layout: Layout) -> tuple[list[Tensor], Any]:
        """What the stage saves to rebuild its final representation: tensors (saved
        with save_for_backward) and plain metadata. Default: the representation."""
        return list(carry.values), None

    @classmethod
    def unpack(cls, tensors: Sequence[Tensor], meta: Any, layout: Layout) -> Carry:
        return Carry(tensors)

    @classmethod
    def output_determines_state(cls) -> bool:
        """Whether the stage output alone gives back the final state (the stage has a
        public `inverse`)."""
        return False

    def tolerance(self, dtype: torch.dtype) -> float:
        """Relative reconstruction error this coupling allows when its branches
        compute in `dtype` (rounding only for exact families)."""
        return RTOL.get(dtype, 1e-4)

    # --- the steps ---
    def step(self, state: State, context: Sequence[Any], call: Call) -> State:
        """The forward, differentiable: what storing mode runs."""
        raise NotImplementedError

    def forward_step(self, carry: Carry, context: Sequence[Any], call: Call) -> Aux:
        """The reversible forward of one coupling, on `carry`; returns what its
        backward needs besides the carry (usually nothing)."""
        carry.values = list(self.step(tuple(carry.values), context, call))
        return ()

    def inverse_step(
        self, carry: Carry, aux: Aux, context: Sequence[Any], call: Call
    ) -> None:
        """Rebuild this coupling's input representation from its output."""
        raise NotImplementedError

    def backward_step(
        self,
        carry: Carry,
        aux: Aux,
        context: Sequence[Any],
        wrt_context: Sequence[Tensor],
        call: Call,
        grads: dict[int, Tensor],
    ) -> None:
        """Rebuild the input from the output and back-propagate the state gradients;
        parameter and context gradients are added into `grads` by ``id()``."""
        raise NotImplementedError


def same_family(couplings: Sequence[nn.Module]) -> type[Coupling]:
    kinds = {type(c) for c in couplings}
    if len(kinds) != 1 or not issubclass(next(iter(kinds)), Coupling):
        names = sorted(k.__name__ for k in kinds)
        raise ConversionError(
            f"A ReversibleStage holds couplings of one family, got {names}. Build one "
            "stage per family (revcompile.runtime.couplings.FAMILIES)."
        )
    return next(iter(kinds))
