"""The autograd function behind a reversible stage: store the output, rebuild the rest.

Note [Why a stage stores only its output]
Each coupling is exactly invertible, so the stage's input and every intermediate value
can be rebuilt from the stage's output during backward. The forward therefore runs under
no_grad and saves only the output (and the context tensors, which are shared with the
rest of the model anyway); activation memory no longer grows with the number of
couplings. Parameters are inputs of the function, so their gradients are ordinary
autograd outputs: `.grad` accumulation, hooks, frozen parameters and DDP's reducer work
as with any other layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from revcompile.errors import ConversionError, DoubleBackwardError
from revcompile.runtime.coupling import Carry, keyed_call
from revcompile.runtime.state import (
    AutocastState,
    RngTape,
    buffers_restored,
    cuda_devices,
    mutable_buffers,
    running_stats_frozen,
)

if TYPE_CHECKING:
    from revcompile.runtime.stage import ReversibleStage


class ReversibleFunction(torch.autograd.Function):
    """``(x, *context, *params) -> y`` for one `ReversibleStage`; `x` in the stream
    dtype, F and G computing in `compute` (Note [Float64 stream] in stage.py)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        stage: ReversibleStage,
        context_template: tuple[Any, ...],
        n_context: int,
        compute: torch.dtype | None,
        x: Tensor,
        *rest: Tensor,
    ) -> Tensor:
        context_tensors = rest[:n_context]
        context = _fill(context_template, context_tensors)
        tape = RngTape(cuda_devices((x, *context_tensors)))
        buffers = mutable_buffers(stage)
        versions = [b._version for b in buffers]
        x_version = x._version

        # Runs under no_grad (autograd.Function.forward always does): nothing is stored.
        y = stage.run_couplings(x, context, tape.record, compute)

        if x._version != x_version:
            raise ConversionError(
                f"A coupling of {stage.describe()} modified the stage input in place. "
                "The input may be read by other layers and the backward could not "
                "rebuild it. Make in-place ops inside F and G out of place (e.g. "
                "nn.ReLU(inplace=False))."
            )
        ctx.stage = stage
        ctx.context_template = context_template
        ctx.compute = compute
        ctx.tape = tape
        ctx.autocast = AutocastState.capture(x.device.type)
        ctx.mutated = [
            b for b, v in zip(buffers, versions, strict=True) if b._version != v
        ]
        # Parameters belong to the stage's modules, not to this step: keep references
        # rather than saving them, so saved-tensor accounting shows activations only.
        ctx.params = rest[n_context:]
        ctx.save_for_backward(y, *context_tensors)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        stage: ReversibleStage = ctx.stage
        if torch.is_grad_enabled():
            raise DoubleBackwardError(
                f"Double backward through {stage.describe()}: its backward rebuilds "
                "activations and cannot itself be differentiated (create_graph=True). "
                "Run this computation under `revcompile.storing_activations()`, which "
                "uses plain autograd and supports higher-order gradients."
            )
        y, *context_saved = ctx.saved_tensors
        params = ctx.params
        # Context as fresh leaves: gradients stop here and are returned below.
        context_leaves = [
            c.detach().requires_grad_(c.requires_grad) for c in context_saved
        ]
        context = _fill(ctx.context_template, context_leaves)
        wrt_context = [c for c in context_leaves if c.requires_grad]

        grads: dict[int, Tensor] = {}
        carry = Carry(*stage.split(y), *stage.split(dy))
        # 1. Walk the couplings from last to first, rebuilding each input from its
        #    output and back-propagating through one coupling at a time.
        # 2. Replay the forward's RNG draws and autocast state; freeze running stats
        #    and undo other buffer updates (Note [Exactly once] in state.py).
        with (
            ctx.tape.restoring(),
            ctx.autocast.restored(),
            running_stats_frozen(stage),
            buffers_restored(ctx.mutated),
        ):
            for i in reversed(range(len(stage.couplings))):
                stage.couplings[i].backward_step(
                    carry,
                    context,
                    wrt_context,
                    keyed_call(ctx.tape.replay, i, ctx.compute),
                    grads,
                )
        # 3. Return gradients in input order: x, context tensors, parameters.
        dx = stage.join(carry.dy1, carry.dy2) if ctx.needs_input_grad[4] else None
        d_context = [grads.get(id(c)) for c in context_leaves]
        d_params = [grads.get(id(p)) for p in params]
        return (None, None, None, None, dx, *d_context, *d_params)


def _fill(template: tuple[Any, ...], tensors: Any) -> tuple[Any, ...]:
    """Put tensors back into the context where `template` has `TENSOR` placeholders;
    the template's other entries are plain values (None, ints, flags)."""
    it = iter(tensors)
    return tuple(next(it) if t is TENSOR else t for t in template)


class _TensorSlot:
    def __repr__(self) -> str:
        return "<tensor>"


TENSOR = _TensorSlot()
