"""Momentum residual networks (Sander et al. 2021, momentumnet):
``coupling="momentum"``.

A full-width stream x and a velocity v, starting at rest; block k's own branch f_k:

    v <- g v + (1 - g) f_k(x)        x <- x + v
    x <- x - v                       v <- (v - (1 - g) f_k(x)) / g     (inverse)

g -> 0 is the residual model itself (``v = f_k(x)``); g = 0.9, the default, is
momentumnet's (their CIFAR and ImageNet models match ResNets' accuracy there, and the
inverse keeps log2(1/0.9) = 0.15 bits per element and step). The inverse divides by
g, so the stage holds x and v as integers with an information buffer and rebuilds
them bit for bit at any depth (Note [Integer stream] in exact.py); ``exact=False``
uses float division, which drifts as eps / g^N and warns. Build as

    ReversibleStage([MomentumCoupling(f, gamma=0.9) for f in fs])

The exit is x; the stage saves x, v, the unit and the buffer (int64: 3 tensors of the
stream's shape below 350 couplings at g = 0.9).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from revcompile.errors import ConversionError
from revcompile.runtime.couplings.base import (
    Aux,
    Call,
    Carry,
    Layout,
    State,
)
from revcompile.runtime.couplings.exact import Arith, Ratio
from revcompile.runtime.couplings.hamiltonian import scaled
from revcompile.runtime.couplings.scaling import ScalingCoupling
from revcompile.runtime.couplings.vjp import branch_vjp

V = 1  # the velocity's slot in the information buffers


class MomentumCoupling(ScalingCoupling):
    """``v <- g v + (1 - g) f(x)``, ``x <- x + v``; f maps ``(x, *context)`` to a
    tensor shaped like x. With ``exact=True`` g is used as the nearest fraction with
    denominator <= 1024 (`gamma` then holds that value)."""

    family = "momentum"
    splits = False

    def __init__(self, f: nn.Module, gamma: float = 0.9, exact: bool = True) -> None:
        super().__init__()
        if not gamma > 0:
            raise ConversionError(f"MomentumCoupling needs gamma > 0, got {gamma}.")
        self.f = f
        self.exact = exact
        self.factor: Ratio | float = Ratio.of(gamma, "gamma") if exact else gamma
        self.gamma = self.factor.value if isinstance(self.factor, Ratio) else gamma

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, exact={self.exact}"

    def amplification(self) -> float:
        return 1.0 / self.gamma

    @classmethod
    def enter(cls, x: Tensor, layout: Layout) -> State:
        return x, x.new_zeros(x.shape)

    @classmethod
    def enter_grad(cls, grads: Sequence[Tensor], layout: Layout) -> Tensor:
        return grads[0]

    @classmethod
    def leave(cls, state: State, x: Tensor, layout: Layout) -> Tensor:
        return state[0]

    @classmethod
    def leave_grad(cls, dy: Tensor, layout: Layout) -> tuple[list[Tensor], None]:
        return [dy, dy.new_zeros(dy.shape)], None

    def step(self, state: State, context: Sequence[Any], call: Call) -> State:
        x, v = state
        kick = scaled(call("f", self.f, x, *context), 1.0 - self.gamma)
        v = v * self.gamma + kick
        return x + v, v

    def forward_step(self, carry: Carry, context: Sequence[Any], call: Call) -> Aux:
        a: Arith = carry.meta
        x, v = carry.values
        kick = scaled(call("f", self.f, a.decode(x), *context), 1.0 - self.gamma)
        v = a.add(a.mul(v, V, self.factor), kick)
        carry.values = [a.combine(x, v), v]
        return ()

    def inverse_step(
        self, carry: Carry, aux: Aux, context: Sequence[Any], call: Call
    ) -> None:
        a: Arith = carry.meta
        x, v = carry.values
        x = a.uncombine(x, v)
        kick = scaled(call("f", self.f, a.decode(x), *context), 1.0 - self.gamma)
        carry.values = [x, a.div(a.sub(v, kick), V, self.factor)]

    def backward_step(
        self,
        carry: Carry,
        aux: Aux,
        context: Sequence[Any],
        wrt_context: Sequence[Tensor],
        call: Call,
        grads: dict[int, Tensor],
    ) -> None:
        a: Arith = carry.meta
        w = 1.0 - self.gamma
        x, v = carry.values
        # 1. x_in = x - v; the gradient reaching the new v: dv + dx (x_out = x_in + v).
        x = a.uncombine(x, v)
        carry.add_grad(V, carry.grads[0])
        # 2. f(x_in) with a graph; back-propagate (1 - g) dv through it.
        f, dx_f = branch_vjp(
            call, "f", self.f, a.decode(x), context, wrt_context,
            scaled(carry.grads[V], w), grads,
        )  # fmt: skip
        # 3. v_in = (v - (1 - g) f) / g; dx_in = dx + f's part, dv_in = g dv.
        carry.values = [x, a.div(a.sub(v, scaled(f, w)), V, self.factor)]
        del f, v
        carry.add_grad(0, dx_f)
        carry.scale_grad(V, self.gamma)
