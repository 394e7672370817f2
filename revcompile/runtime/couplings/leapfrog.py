"""The leapfrog network of Chang et al. 2018 (a second-order ODE, Y'' = f(Y)):
``coupling="leapfrog"``.

Two consecutive full-width states ``(Y_{j-1}, Y_j)``; block j's own branch f_j takes

    Y_{j+1} = 2 Y_j - Y_{j-1} + h^2 f_j(Y_j)     (inverse: the same formula, with
                                                   Y_{j+1} and Y_{j-1} exchanged)

The stage starts at rest, ``Y_0 = Y_{-1} = x``, and its first coupling uses
coefficient 1 instead of h^2 (``start=True``), so that it *is* the first residual
block, ``Y_1 = x + f_1(x)``; later steps carry the velocity ``Y_j - Y_{j-1}`` on, so
each block adds its update to all the earlier ones again. With h = 1, the default,
every step weighs its branch as the residual model does. Build as

    couplings = [LeapfrogCoupling(f, h=1.0, start=(j == 0)) for j, f in enumerate(fs)]
    ReversibleStage(couplings)

The exit is ``Y_N``; the stage saves ``(Y_{N-1}, Y_N)``. Reconstruction error: the
linear part of the inverse has a double root at 1, so a rounding error is carried on
as a velocity and grows at least linearly with depth, and the stream itself grows as
every update is re-added: in float32 we measured 9e-7, 4e-5 and 1.3e-3 relative at 8,
32 and 128 blocks (benchmarks/couplings.py), over the float32 tolerance at 128, so a
deep float32 leapfrog stage wants ``guard=True``. Exactly zero under the float64
stream (autocast, low-precision inputs) at every depth measured.
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


class LeapfrogCoupling(LastStream):
    """``(Y_{j-1}, Y_j) -> (Y_j, 2 Y_j - Y_{j-1} + c f(Y_j))`` with ``c = h^2``, or 1
    for the stage's first coupling (`start`)."""

    family = "leapfrog"

    def __init__(self, f: nn.Module, h: float = 1.0, start: bool = False) -> None:
        super().__init__()
        if not h > 0:
            raise ConversionError(f"LeapfrogCoupling needs a step h > 0, got {h}.")
        self.f = f
        self.h = float(h)
        self.start = start
        self.c = 1.0 if start else self.h**2

    def extra_repr(self) -> str:
        return f"h={self.h}, start={self.start}"

    def step(self, state: State, context: Sequence[Any], call: Call) -> State:
        prev, cur = state
        kick = scaled(call("f", self.f, cur, *context), self.c)
        return cur, 2 * cur - prev + kick

    def inverse_step(
        self, carry: Carry, aux: Aux, context: Sequence[Any], call: Call
    ) -> None:
        cur, new = carry.values
        kick = scaled(call("f", self.f, cur, *context), self.c)
        carry.values = [2 * cur - new + kick, cur]

    def backward_step(
        self,
        carry: Carry,
        aux: Aux,
        context: Sequence[Any],
        wrt_context: Sequence[Tensor],
        call: Call,
        grads: dict[int, Tensor],
    ) -> None:
        cur, new = carry.values
        d_new = carry.grads[1]
        # 1. f(Y_j) with a graph; back-propagate c dY_{j+1} through it.
        f, d_cur = branch_vjp(
            call, "f", self.f, cur, context, wrt_context, scaled(d_new, self.c), grads
        )
        # 2. Y_{j-1} = 2 Y_j - Y_{j+1} + c f(Y_j); dY_j += 2 dY_{j+1} + f's part;
        #    dY_{j-1} = -dY_{j+1}.
        carry.values[1] = 2 * cur - new + scaled(f, self.c)
        del f, new
        carry.add_grad(0, d_cur)
        carry.add_grad(0, 2 * d_new)
        carry.scale_grad(1, -1.0)
        del d_new
        # 3. (Y_j, Y_{j-1}) -> (Y_{j-1}, Y_j), gradients alike.
        carry.swap()
