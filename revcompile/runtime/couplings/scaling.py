"""The reversible representation shared by the families that scale their stream by a
factor (momentum's g, scaled's l and b): integers with an information buffer, or
floats (Note [Integer stream] in exact.py)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from revcompile.errors import ConversionError
from revcompile.runtime.couplings.base import (
    RTOL,
    Carry,
    Coupling,
    Layout,
    ReconstructionWarning,
    State,
)
from revcompile.runtime.couplings.exact import Arith, FloatArith, IntArith


class ScalingCoupling(Coupling):
    """The reversible representation of momentum and scaled: the state's tensors in
    `IntArith` (``exact=True``) or `FloatArith`, kept in the carry's `meta`."""

    exact: bool

    def amplification(self) -> float:
        """How much the float inverse of one step can grow an error."""
        raise NotImplementedError

    @classmethod
    def open(cls, state: State, couplings: Sequence[Coupling]) -> Carry:
        kinds = {c.exact for c in couplings}  # type: ignore[attr-defined]
        if len(kinds) != 1:
            raise ConversionError(
                f"A {cls.family} stage's couplings must all have the same `exact`."
            )
        arith: Arith = IntArith.for_input(state) if kinds.pop() else FloatArith()
        if isinstance(arith, FloatArith):
            _warn_if_drifting(cls.family, couplings, state[0].dtype)
        return Carry([arith.encode(s) for s in state], meta=arith)

    @classmethod
    def decode(cls, carry: Carry) -> State:
        arith: Arith = carry.meta
        if isinstance(arith, IntArith):
            arith.raise_if_overflowed(f"A {cls.family} stage")
        return tuple(arith.decode(v) for v in carry.values)

    @classmethod
    def pack(cls, carry: Carry, y: Tensor, layout: Layout) -> tuple[list[Tensor], Any]:
        arith: Arith = carry.meta
        meta = arith.meta() if isinstance(arith, IntArith) else None
        return [*carry.values, *arith.tensors()], (len(carry.values), meta)

    @classmethod
    def unpack(cls, tensors: Sequence[Tensor], meta: Any, layout: Layout) -> Carry:
        n, arith_meta = meta
        arith: Arith = FloatArith()
        if arith_meta is not None:
            arith = IntArith.load(tensors[n:], arith_meta)
        return Carry(tensors[:n], meta=arith)

    @classmethod
    def output_determines_state(cls) -> bool:
        return False


def _warn_if_drifting(
    family: str, couplings: Sequence[Coupling], dtype: torch.dtype
) -> None:
    amp = math.prod(c.amplification() for c in couplings)  # type: ignore[attr-defined]
    eps = torch.finfo(dtype).eps
    tol = RTOL.get(dtype, 1e-4)
    if eps * amp > tol:
        warnings.warn(
            ReconstructionWarning(
                f"A {family} stage of {len(couplings)} couplings in float arithmetic "
                f"(exact=False) grows rounding errors by up to {amp:.3g} when it "
                f"rebuilds its input: {eps * amp:.3g} relative in {dtype}, over the "
                f"tolerance {tol:.3g}. Use exact=True (the default, Note [Integer "
                "stream]), factors nearer 1, fewer couplings, or guard=True."
            ),
            stacklevel=4,
        )
