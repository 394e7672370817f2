"""Entry and exit maps shared by several families: channel halves, or two copies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from revcompile.runtime.couplings.base import Carry, Coupling, Layout, State


class SplitCoupling(Coupling):
    """Entry and exit of the families on the two channel halves of the stage input:
    the state is ``split(x)`` and the output ``join(state)``, so the stage saves its
    output and takes the final state back as two views of it."""

    splits = True

    @classmethod
    def enter(cls, x: Tensor, layout: Layout) -> State:
        return layout.split(x)

    @classmethod
    def enter_grad(cls, grads: Sequence[Tensor], layout: Layout) -> Tensor:
        return layout.join(grads)

    @classmethod
    def leave(cls, state: State, x: Tensor, layout: Layout) -> Tensor:
        return layout.join(state)

    @classmethod
    def leave_grad(cls, dy: Tensor, layout: Layout) -> tuple[list[Tensor], None]:
        return list(layout.split(dy)), None

    @classmethod
    def pack(cls, carry: Carry, y: Tensor, layout: Layout) -> tuple[list[Tensor], Any]:
        return [y], None

    @classmethod
    def unpack(cls, tensors: Sequence[Tensor], meta: Any, layout: Layout) -> Carry:
        return Carry(layout.split(tensors[0]))

    @classmethod
    def output_determines_state(cls) -> bool:
        return True


class TwoStreams(Coupling):
    """Entry of the full-width two-stream families (twin, midpoint, leapfrog): both
    streams start as the stage input, ``(x, x)``; exits are the family's own."""

    splits = False

    @classmethod
    def enter(cls, x: Tensor, layout: Layout) -> State:
        return x, x

    @classmethod
    def enter_grad(cls, grads: Sequence[Tensor], layout: Layout) -> Tensor:
        return grads[0] + grads[1]


class LastStream(TwoStreams):
    """Exit of the two-step families (midpoint, leapfrog): the state is
    ``(Y_{j-1}, Y_j)`` and the output the latest, ``Y_j``."""

    @classmethod
    def leave(cls, state: State, x: Tensor, layout: Layout) -> Tensor:
        return state[1]

    @classmethod
    def leave_grad(cls, dy: Tensor, layout: Layout) -> tuple[list[Tensor], None]:
        return [dy.new_zeros(dy.shape), dy], None
