"""The Hamiltonian (Verlet) coupling of Chang et al. 2018: ``coupling="hamiltonian"``.

The stage input is split along channels into ``(Y, Z)``; each coupling takes one
Verlet step of size h:

    Y <- Y + h F(Z)          Z <- Z - h G(Y)          (exact inverse:
    Z <- Z + h G(Y)          Y <- Y - h F(Z)           any F and G)

F and G are built like additive's (F maps the Z half to the Y half's shape, G back).
With h = 1, the default, the Y update is the residual block's own update, as in
additive; G enters with a minus sign, so a rewrite that slices G from a pretrained
branch g and wants the same warm start as additive negates its output (``G = -g``).

    ReversibleStage([HamiltonianCoupling(F_k, G_k, h=1.0) for ...], dim=1)

Reconstruction error: as additive. ``h * F`` is rounded to the branch's dtype before it
is added, identically in forward and inverse, so under the float64 stream the stream
is still rebuilt bit for bit for any h.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from revcompile.errors import ConversionError
from revcompile.runtime.couplings.base import Aux, Call, Carry, State
from revcompile.runtime.couplings.maps import SplitCoupling
from revcompile.runtime.couplings.vjp import branch_vjp


def scaled(t: Tensor, h: float) -> Tensor:
    """``h * t`` in t's dtype (no copy for h = 1): the same value in every pass."""
    return t if h == 1.0 else t * h


class HamiltonianCoupling(SplitCoupling):
    """``Y += h F(Z)``, ``Z -= h G(Y)``: one Verlet step of a Hamiltonian network."""

    family = "hamiltonian"

    def __init__(self, F: nn.Module, G: nn.Module, h: float = 1.0) -> None:
        super().__init__()
        if not h > 0:
            raise ConversionError(f"HamiltonianCoupling needs a step h > 0, got {h}.")
        self.F = F
        self.G = G
        self.h = float(h)

    def extra_repr(self) -> str:
        return f"h={self.h}"

    def step(self, state: State, context: Sequence[Any], call: Call) -> State:
        y, z = state
        y = y + scaled(call("F", self.F, z, *context), self.h)
        z = z - scaled(call("G", self.G, y, *context), self.h)
        return y, z

    def inverse_step(
        self, carry: Carry, aux: Aux, context: Sequence[Any], call: Call
    ) -> None:
        y, z = carry.values
        z = z + scaled(call("G", self.G, y, *context), self.h)
        y = y - scaled(call("F", self.F, z, *context), self.h)
        carry.values = [y, z]

    def backward_step(
        self,
        carry: Carry,
        aux: Aux,
        context: Sequence[Any],
        wrt_context: Sequence[Tensor],
        call: Call,
        grads: dict[int, Tensor],
    ) -> None:
        h = self.h
        # 1. z_in = z + h G(y): G's gradients from -h dz; the total gradient of y.
        g, dy_g = branch_vjp(
            call, "G", self.G, carry.values[0], context, wrt_context,
            carry.grads[1] * -h, grads,
        )  # fmt: skip
        carry.add(1, scaled(g, h))
        del g
        carry.add_grad(0, dy_g)
        # 2. y_in = y - h F(z_in): F's gradients from h dy; dz_in = dz + F's part.
        f, dz_f = branch_vjp(
            call, "F", self.F, carry.values[1], context, wrt_context,
            scaled(carry.grads[0], h), grads,
        )  # fmt: skip
        carry.add(0, scaled(f, h), subtract=True)
        del f
        carry.add_grad(1, dz_f)
