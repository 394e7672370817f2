"""The additive coupling (RevNet, Gomez et al. 2017): ``coupling="additive"``.

The stage input is split along channels into ``(x1, x2)``; each coupling computes

    y1 = x1 + F(x2)        y2 = x2 + G(y1)          (exact inverse:
    x2 = y2 - G(y1)        x1 = y1 - F(x2)           any F and G)

The rewrite builds a stage of it from one (F, G) pair per residual block, F mapping the
x2 half to the shape of the x1 half and G back (uneven splits work):

    ReversibleStage([AdditiveCoupling(F_k, G_k) for ...], dim=1, split_sizes=(c1, c2))

Reconstruction error: one rounding of ``(x1 + f) - f`` per half and coupling, not
amplified by the coupling itself; under the float64 stream it is exactly zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from revcompile.runtime.couplings.base import (
    Aux,
    Call,
    Carry,
    State,
    plain_call,
)
from revcompile.runtime.couplings.maps import SplitCoupling
from revcompile.runtime.couplings.vjp import branch_vjp


class AdditiveCoupling(SplitCoupling):
    """``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``; exactly invertible for any F and G.

    F maps the x2 part to the shape of the x1 part and G maps back, so uneven splits
    work. Both receive the stage's context tensors (masks, position tables...) as extra
    positional arguments: ``F(x2, *context)``.

    Example:
        >>> c = AdditiveCoupling(nn.Linear(4, 4), nn.Linear(4, 4)).double()
        >>> x1, x2 = torch.randn(2, 3, 4, dtype=torch.float64)
        >>> r1, r2 = c.inverse(*c(x1, x2))
        >>> bool((r1 - x1).abs().max() < 1e-12 and (r2 - x2).abs().max() < 1e-12)
        True
    """

    family = "additive"

    def __init__(self, F: nn.Module, G: nn.Module) -> None:
        super().__init__()
        self.F = F
        self.G = G

    def forward(self, x1: Tensor, x2: Tensor, *context: Any) -> State:
        return self.step((x1, x2), context, plain_call)

    def inverse(self, y1: Tensor, y2: Tensor, *context: Any) -> State:
        carry = Carry((y1, y2))
        self.inverse_step(carry, (), context, plain_call)
        return tuple(carry.values)

    def step(self, state: State, context: Sequence[Any], call: Call) -> State:
        x1, x2 = state
        y1 = x1 + call("F", self.F, x2, *context)
        y2 = x2 + call("G", self.G, y1, *context)
        return y1, y2

    def inverse_step(
        self, carry: Carry, aux: Aux, context: Sequence[Any], call: Call
    ) -> None:
        y1, y2 = carry.values
        x2 = y2 - call("G", self.G, y1, *context)
        x1 = y1 - call("F", self.F, x2, *context)
        carry.values = [x1, x2]

    def backward_step(
        self,
        carry: Carry,
        aux: Aux,
        context: Sequence[Any],
        wrt_context: Sequence[Tensor],
        call: Call,
        grads: dict[int, Tensor],
    ) -> None:
        """RevNet's Algorithm 1: G and F each run once, with grad, on rebuilt values;
        the same evaluations serve the inverse and the vector-Jacobian products."""
        # 1. g = G(y1) with a graph; back-propagate dy2 through it: G's parameter
        #    gradients, and the part of the gradient reaching y1 that passes G.
        g, dy1_g = branch_vjp(
            call, "G", self.G, carry.values[0], context, wrt_context, carry.grads[1],
            grads,
        )  # fmt: skip
        # 2. x2 = y2 - G(y1); the total gradient reaching y1.
        carry.add(1, g, subtract=True)
        del g
        carry.add_grad(0, dy1_g)
        # 3. f = F(x2) with a graph on the rebuilt x2; back-propagate y1's gradient.
        f, dx2_f = branch_vjp(
            call, "F", self.F, carry.values[1], context, wrt_context, carry.grads[0],
            grads,
        )  # fmt: skip
        # 4. x1 = y1 - F(x2); dx1 = dy1, dx2 = dy2 + F's input gradient.
        carry.add(0, f, subtract=True)
        del f
        carry.add_grad(1, dx2_f)
