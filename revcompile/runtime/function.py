"""The autograd function behind a reversible stage: store the final state, rebuild the
rest.

Note [Why a stage stores only its output]
Each coupling is invertible, so the stage's input and every intermediate value can be
rebuilt from the stage's final state during backward. The forward therefore runs under
no_grad and saves only that state (the output itself for the splitting families; the
two streams for twin, midpoint and leapfrog, whose exit is not invertible; the integer
representation for momentum and scaled), plus the context tensors, which are shared
with the rest of the model anyway: activation memory no longer grows with the number
of couplings. Parameters are inputs of the function, so their gradients are ordinary
autograd outputs: `.grad` accumulation, hooks, frozen parameters and DDP's reducer
work as with any other layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from revcompile.errors import ConversionError, DoubleBackwardError, ReconstructionError
from revcompile.runtime.couplings.base import Unrebuildable, compute_dtype, keyed_call
from revcompile.runtime.guard import anchored_backward, check_rebuilt, record_failure
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
    dtype, branches computing in `compute` (Note [Float64 stream] in stage.py)."""

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
        carry, auxes, y = stage.run_reversible(x, context, tape.record, compute)

        if x._version != x_version:
            raise ConversionError(
                f"A coupling of {stage.describe()} modified the stage input in place. "
                "The input may be read by other layers and the backward could not "
                "rebuild it. Make in-place ops inside F and G out of place (e.g. "
                "nn.ReLU(inplace=False))."
            )
        layout = stage.layout(x)
        saved, ctx.meta = stage.kind.pack(carry, y, layout)
        del carry
        ctx.stage = stage
        ctx.layout = layout
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
        ctx.sizes = (len(saved), [len(a) for a in auxes], stage.guard)
        guarded = [x] if stage.guard else []
        flat_aux = [t for a in auxes for t in a]
        ctx.save_for_backward(*saved, *flat_aux, *guarded, *context_tensors)
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
        n_saved, aux_sizes, guarded = ctx.sizes
        tensors = list(ctx.saved_tensors)
        saved, tensors = tensors[:n_saved], tensors[n_saved:]
        auxes = []
        for n in aux_sizes:
            auxes.append(tuple(tensors[:n]))
            tensors = tensors[n:]
        x_saved = tensors.pop(0) if guarded else None
        context_saved = tensors
        # Context as fresh leaves: gradients stop here and are returned below.
        context_leaves = [
            c.detach().requires_grad_(c.requires_grad) for c in context_saved
        ]
        context = _fill(ctx.context_template, context_leaves)
        wrt_context = [c for c in context_leaves if c.requires_grad]
        kind, layout = stage.kind, ctx.layout
        calls = [
            keyed_call(ctx.tape.replay, i, ctx.compute)
            for i in range(len(stage.couplings))
        ]

        grads: dict[int, Tensor] = {}
        failure = ""
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
            carry = kind.unpack(saved, ctx.meta, layout)
            d_state, dx_exit = kind.leave_grad(dy, layout)
            carry.start_backward(d_state)
            del saved, d_state
            try:
                for i in reversed(range(len(stage.couplings))):
                    stage.couplings[i].backward_step(
                        carry, auxes[i], context, wrt_context, calls[i], grads
                    )
            except Unrebuildable as e:
                failure = e.detail
            # 3. Under the guard, compare the rebuilt input with the saved one and
            #    re-anchor on the saved one if they differ (Note [Drift guard]).
            if x_saved is not None:
                rebuilt = None if failure else kind.decode(carry)
                dtype = compute_dtype(ctx.compute or x_saved.dtype)
                step = check_rebuilt(stage, rebuilt, x_saved, dtype, failure)
                if step.anchored:
                    grads = {}
                    dx = anchored_backward(
                        stage, x_saved, dy, context, wrt_context, calls, grads
                    )
                    return _gradients(ctx, dx, context_leaves, grads)
            elif failure:
                record_failure(stage, failure)
                raise ReconstructionError(
                    f"{stage.describe()} could not rebuild its input: {failure}. "
                    "Nothing was saved to fall back on: build the stage with "
                    "guard=True (the default for fixed_point), or run it under "
                    "`revcompile.storing_activations()`."
                )
        # 4. Through the entry map; gradients in input order: x, context, parameters.
        dx = kind.enter_grad(carry.grads, layout)
        dx = dx if dx_exit is None else dx + dx_exit
        return _gradients(ctx, dx, context_leaves, grads)


def _gradients(
    ctx: Any, dx: Tensor, context_leaves: list[Tensor], grads: dict[int, Tensor]
) -> tuple[Tensor | None, ...]:
    d_context = [grads.get(id(c)) for c in context_leaves]
    d_params = [grads.get(id(p)) for p in ctx.params]
    dx_out = dx if ctx.needs_input_grad[4] else None
    return (None, None, None, None, dx_out, *d_context, *d_params)


def _fill(template: tuple[Any, ...], tensors: Any) -> tuple[Any, ...]:
    """Put tensors back into the context where `template` has `TENSOR` placeholders;
    the template's other entries are plain values (None, ints, flags)."""
    it = iter(tensors)
    return tuple(next(it) if t is TENSOR else t for t in template)


class _TensorSlot:
    def __repr__(self) -> str:
        return "<tensor>"


TENSOR = _TensorSlot()
