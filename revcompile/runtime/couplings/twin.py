"""Two full-width streams (Reformer, Kitaev et al. 2020; Rev-ViT; MEFT's pairing):
``coupling="twin"``.

Both streams start as the stage input, ``x1 = x2 = x``; coupling k takes two
consecutive residual blocks' own branches, at full width, as F and G:

    y1 = x1 + f_{2k-1}(x2)        y2 = x2 + f_{2k}(y1)       (inverse as additive)

In a transformer layer attention is F and MLP is G. The exit is ``x1 + x2 - x``:
stream 1 carries the odd branches' updates and stream 2 the even ones', each on top
of one copy of x, so the exit is x plus every branch update with weight 1, as in the
residual model. For one coupling it *is* the residual model (``y1 = x + f1(x)`` is the
first block's output exactly and ``x1 + x2 - x = y1 + f2(y1)``), which neither
Reformer's average ``(x1 + x2) / 2`` (halves every update) nor the last stream alone
(drops the odd ones) gives; from the second coupling on a branch sees its own stream,
which lacks the other stream's updates (benchmarks/couplings.py measures how far from
the residual model each exit ends). An odd block count leaves the last G empty
(``G=None``: ``y2 = x2``). Build a stage of it as

    fs = [block.branch for block in blocks]          # (stream, *context) -> stream
    ReversibleStage([TwinCoupling(F, G) for F, G in pairs(fs)])

The exit reads the stage input, so the stage saves the final two streams (2 tensors)
rather than its output. Reconstruction error: as additive, per stream; exactly zero
under the float64 stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from revcompile.runtime.couplings.base import (
    Aux,
    Call,
    Carry,
    Layout,
    State,
)
from revcompile.runtime.couplings.maps import TwoStreams
from revcompile.runtime.couplings.vjp import branch_vjp


class TwinCoupling(TwoStreams):
    """``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` on two full-width streams; F and G
    are two consecutive blocks' branches, mapping ``(stream, *context)`` to a tensor
    shaped like the stream. ``G=None`` for the last of an odd number of blocks."""

    family = "twin"

    def __init__(self, F: nn.Module, G: nn.Module | None = None) -> None:
        super().__init__()
        self.F = F
        self.G = G

    @classmethod
    def leave(cls, state: State, x: Tensor, layout: Layout) -> Tensor:
        x1, x2 = state
        return x1 + x2 - x

    @classmethod
    def leave_grad(cls, dy: Tensor, layout: Layout) -> tuple[list[Tensor], Tensor]:
        return [dy, dy], -dy

    def step(self, state: State, context: Sequence[Any], call: Call) -> State:
        x1, x2 = state
        y1 = x1 + call("F", self.F, x2, *context)
        y2 = x2 if self.G is None else x2 + call("G", self.G, y1, *context)
        return y1, y2

    def inverse_step(
        self, carry: Carry, aux: Aux, context: Sequence[Any], call: Call
    ) -> None:
        y1, y2 = carry.values
        x2 = y2 if self.G is None else y2 - call("G", self.G, y1, *context)
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
        """As additive (RevNet's Algorithm 1), on full-width streams."""
        # 1. x2 = y2 - G(y1); G's gradients from dy2, the total gradient reaching y1.
        if self.G is not None:
            g, dy1_g = branch_vjp(
                call, "G", self.G, carry.values[0], context, wrt_context,
                carry.grads[1], grads,
            )  # fmt: skip
            carry.add(1, g, subtract=True)
            del g
            carry.add_grad(0, dy1_g)
        # 2. x1 = y1 - F(x2); F's gradients from dy1; dx2 = dy2 + F's input gradient.
        f, dx2_f = branch_vjp(
            call, "F", self.F, carry.values[1], context, wrt_context, carry.grads[0],
            grads,
        )  # fmt: skip
        carry.add(0, f, subtract=True)
        del f
        carry.add_grad(1, dx2_f)
