"""The midpoint (leapfrog-in-time) network of Chang et al. 2018:
``coupling="midpoint"``.

Two consecutive full-width states ``(Y_{j-1}, Y_j)``; block j's own branch f_j takes

    Y_{j+1} = Y_{j-1} + 2h f_j(Y_j)        (inverse: Y_{j-1} = Y_{j+1} - 2h f_j(Y_j))

The stage starts with ``Y_0 = Y_{-1} = x`` and a first step of coefficient 1 instead
of 2h (``start=True``: an Euler step), so that the first coupling *is* the first
residual block, ``Y_1 = x + f_1(x)``. With h = 1, the default, the scheme integrates
the same ODE as the residual network's unit steps (two steps of size 1 between
``Y_{j-1}`` and ``Y_{j+1}``); h = 1/2 gives Reformer's pairing with the last stream as
exit. The scheme is weakly stable: its second root oscillates, so the function drifts
from the residual model with depth (measured in benchmarks/couplings.py). Build as

    couplings = [MidpointCoupling(f, h=1.0, start=(j == 0)) for j, f in enumerate(fs)]
    ReversibleStage(couplings)

The exit is ``Y_N``; the stage saves ``(Y_{N-1}, Y_N)``. Reconstruction error: one
rounding per step, not amplified by the step itself (``2h f`` is rounded to the
branch's dtype in both directions); exactly zero under the float64 stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from revcompile.errors import ConversionError
from revcompile.runtime.couplings.base import Aux, Call, Carry, State
from revcompile.runtime.couplings.hamiltonian import scaled
from revcompile.runtime.couplings.maps import LastStream
from revcompile.runtime.couplings.vjp import branch_vjp


class MidpointCoupling(LastStream):
    """``(Y_{j-1}, Y_j) -> (Y_j, Y_{j-1} + c f(Y_j))`` with ``c = 2h``, or 1 for the
    stage's first coupling (`start`)."""

    family = "midpoint"

    def __init__(self, f: nn.Module, h: float = 1.0, start: bool = False) -> None:
        super().__init__()
        if not h > 0:
            raise ConversionError(f"MidpointCoupling needs a step h > 0, got {h}.")
        self.f = f
        self.h = float(h)
        self.start = start
        self.c = 1.0 if start else 2.0 * self.h

    def extra_repr(self) -> str:
        return f"h={self.h}, start={self.start}"

    def step(self, state: State, context: Sequence[Any], call: Call) -> State:
        prev, cur = state
        return cur, prev + scaled(call("f", self.f, cur, *context), self.c)

    def inverse_step(
        self, carry: Carry, aux: Aux, context: Sequence[Any], call: Call
    ) -> None:
        cur, new = carry.values
        carry.values = [new - scaled(call("f", self.f, cur, *context), self.c), cur]

    def backward_step(
        self,
        carry: Carry,
        aux: Aux,
        context: Sequence[Any],
        wrt_context: Sequence[Tensor],
        call: Call,
        grads: dict[int, Tensor],
    ) -> None:
        # 1. f(Y_j) with a graph; back-propagate c dY_{j+1} through it.
        f, d_cur = branch_vjp(
            call, "f", self.f, carry.values[0], context, wrt_context,
            scaled(carry.grads[1], self.c), grads,
        )  # fmt: skip
        # 2. Y_{j-1} = Y_{j+1} - c f(Y_j) over Y_{j+1}; dY_j = dY_j + f's part;
        #    dY_{j-1} = dY_{j+1}.
        carry.add(1, scaled(f, self.c), subtract=True)
        del f
        carry.add_grad(0, d_cur)
        # 3. (Y_j, Y_{j-1}) -> (Y_{j-1}, Y_j), gradients alike.
        carry.swap()
