"""The scaled coupling of MEFT (Liao et al. 2023): ``coupling="scaled"``.

The stage input is split along channels into ``(x1, x2)``; each coupling computes

    y1 = l x1 + F(x2)                 y2 = b x2 + G(y1)
    x2 = (y2 - G(y1)) / b             x1 = (y1 - F(x2)) / l         (inverse)

F and G are built like additive's. l = 0.1 and b = 1, the defaults, are MEFT1's
(their BERT fine-tuning runs): there F is a whole pretrained layer, residual included,
so ``l x1`` is a small leak beside it. l = b = 1 is the additive coupling. The inverse
divides, so the stage holds both halves as integers with an information buffer
(Note [Integer stream] in exact.py): exact at any depth, where MEFT's float division
grows errors by 1/l per coupling (10^N). ``exact=False`` uses float division and warns
when that drift is predicted to exceed the tolerance. Build as

    ReversibleStage([ScaledCoupling(F_k, G_k, l=0.1, b=1.0) for ...], dim=-1)

The stage saves both halves, the unit and the buffer of x1 (int64; one page per 16
couplings at l = 0.1, since each keeps log2(10) = 3.3 bits per element).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from revcompile.errors import ConversionError
from revcompile.runtime.couplings.base import Aux, Call, Carry, State
from revcompile.runtime.couplings.exact import Arith, Ratio
from revcompile.runtime.couplings.maps import SplitCoupling
from revcompile.runtime.couplings.scaling import ScalingCoupling
from revcompile.runtime.couplings.vjp import branch_vjp


class ScaledCoupling(ScalingCoupling, SplitCoupling):
    """``y1 = l x1 + F(x2)``, ``y2 = b x2 + G(y1)``. With ``exact=True`` l and b are
    used as the nearest fractions with denominator <= 1024 (`l`, `b` hold those)."""

    family = "scaled"

    def __init__(
        self,
        F: nn.Module,
        G: nn.Module,
        l: float = 0.1,  # noqa: E741 (the paper's name)
        b: float = 1.0,
        exact: bool = True,
    ) -> None:
        super().__init__()
        if not (l > 0 and b > 0):
            raise ConversionError(f"ScaledCoupling needs l, b > 0, got {l}, {b}.")
        self.F = F
        self.G = G
        self.exact = exact
        self.l, self.b = float(l), float(b)
        self.factors: tuple[Ratio | float, Ratio | float] = (self.l, self.b)
        if exact:
            ratios = Ratio.of(l, "l"), Ratio.of(b, "b")
            self.factors = ratios
            self.l, self.b = ratios[0].value, ratios[1].value

    def extra_repr(self) -> str:
        return f"l={self.l}, b={self.b}, exact={self.exact}"

    def amplification(self) -> float:
        return 1.0 / min(self.l, self.b, 1.0)

    def step(self, state: State, context: Sequence[Any], call: Call) -> State:
        x1, x2 = state
        y1 = x1 * self.l + call("F", self.F, x2, *context)
        y2 = x2 * self.b + call("G", self.G, y1, *context)
        return y1, y2

    def forward_step(self, carry: Carry, context: Sequence[Any], call: Call) -> Aux:
        a: Arith = carry.meta
        x1, x2 = carry.values
        f = call("F", self.F, a.decode(x2), *context)
        y1 = a.add(a.mul(x1, 0, self.factors[0]), f)
        g = call("G", self.G, a.decode(y1), *context)
        carry.values = [y1, a.add(a.mul(x2, 1, self.factors[1]), g)]
        return ()

    def inverse_step(
        self, carry: Carry, aux: Aux, context: Sequence[Any], call: Call
    ) -> None:
        a: Arith = carry.meta
        y1, y2 = carry.values
        g = call("G", self.G, a.decode(y1), *context)
        x2 = a.div(a.sub(y2, g), 1, self.factors[1])
        f = call("F", self.F, a.decode(x2), *context)
        carry.values = [a.div(a.sub(y1, f), 0, self.factors[0]), x2]

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
        y1, y2 = carry.values
        # 1. G(y1) with a graph; back-propagate dy2; x2 = (y2 - G(y1)) / b.
        g, dy1_g = branch_vjp(
            call, "G", self.G, a.decode(y1), context, wrt_context, carry.grads[1],
            grads,
        )  # fmt: skip
        x2 = a.div(a.sub(y2, g), 1, self.factors[1])
        del g, y2
        carry.add_grad(0, dy1_g)  # the total gradient reaching y1
        # 2. F(x2) with a graph; back-propagate dy1; x1 = (y1 - F(x2)) / l.
        f, dx2_f = branch_vjp(
            call, "F", self.F, a.decode(x2), context, wrt_context, carry.grads[0],
            grads,
        )  # fmt: skip
        carry.values = [a.div(a.sub(y1, f), 0, self.factors[0]), x2]
        del f, y1
        # 3. dx1 = l dy1, dx2 = b dy2 + F's input gradient.
        carry.scale_grad(0, self.l)
        carry.scale_grad(1, self.b)
        carry.add_grad(1, dx2_f)
