"""`CheckpointedBlock`: a block that stores its input and recomputes the rest.

Note [Checkpoint exactly once]
``torch.utils.checkpoint`` re-runs a block in backward, which counts as a second step
for batch norm (running statistics updated twice) unless the user freezes them by
hand. The memory planner checkpoints the blocks it neither converts nor stores with
the machinery of a reversible stage (Note [Exactly once] in state.py): the forward
runs under no_grad and records the RNG state of every random call; backward re-runs
the block once, with grad, under the forward's autocast state, with the RNG replayed,
running statistics frozen and other buffer updates undone, and returns input,
context and parameter gradients through autograd, so hooks and DDP see each once.
What it keeps between forward and backward: the block's input and context tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from revcompile.errors import ConversionError, DoubleBackwardError
from revcompile.runtime.couplings.vjp import Branch
from revcompile.runtime.mode import is_storing
from revcompile.runtime.state import (
    AutocastState,
    RngTape,
    buffers_restored,
    cuda_devices,
    mutable_buffers,
    running_stats_frozen,
)


class CheckpointedBlock(nn.Module):
    """``block(x, *context)``, recomputed in backward instead of stored.

    Example:
        >>> block = CheckpointedBlock(nn.Sequential(nn.Linear(4, 4), nn.GELU()))
        >>> block(torch.randn(2, 4, requires_grad=True)).sum().backward()
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    @torch.compiler.disable
    def forward(self, x: Tensor, *context: Any) -> Tensor:
        params = [p for p in self.body.parameters() if p.requires_grad]
        tensors = [c for c in context if isinstance(c, Tensor)]
        needs = x.requires_grad or bool(params) or any(t.requires_grad for t in tensors)
        if is_storing() or not torch.is_grad_enabled() or not needs:
            return self.body(x, *context)
        template = tuple(_SLOT if isinstance(c, Tensor) else c for c in context)
        return _Checkpoint.apply(self, template, len(tensors), x, *tensors, *params)


class _Slot:
    """Where a context tensor goes in the template of a call."""


_SLOT = _Slot()


def _fill(template: tuple[Any, ...], tensors: Any) -> tuple[Any, ...]:
    it = iter(tensors)
    return tuple(next(it) if t is _SLOT else t for t in template)


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        block: CheckpointedBlock,
        template: tuple[Any, ...],
        n_context: int,
        x: Tensor,
        *rest: Tensor,
    ) -> Tensor:
        context_tensors = rest[:n_context]
        tape = RngTape(cuda_devices((x, *context_tensors)))
        buffers = mutable_buffers(block.body)
        versions = [b._version for b in buffers]
        # 1. Run under no_grad (autograd.Function.forward always does), recording RNG.
        version = x._version
        y = tape.record("body", block.body, x, *_fill(template, context_tensors))
        if x._version != version:
            raise ConversionError(
                "A checkpointed block modified its input in place, which backward "
                "recomputes it from. Make the block's in-place ops out of place."
            )
        ctx.block, ctx.template, ctx.tape = block, template, tape
        ctx.autocast = AutocastState.capture(x.device.type)
        ctx.mutated = [
            b for b, v in zip(buffers, versions, strict=True) if b._version != v
        ]
        ctx.params = rest[n_context:]
        # 2. Keep the input and context only (Note [Checkpoint exactly once]).
        ctx.save_for_backward(x, *context_tensors)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        block: CheckpointedBlock = ctx.block
        if torch.is_grad_enabled():
            raise DoubleBackwardError(
                "Double backward through a CheckpointedBlock: its backward recomputes "
                "the block and cannot itself be differentiated. Run this computation "
                "under `revcompile.storing_activations()`."
            )
        x, *saved = ctx.saved_tensors
        leaf = x.detach().requires_grad_(x.is_floating_point())
        leaves = [c.detach().requires_grad_(c.requires_grad) for c in saved]
        wrt = [c for c in leaves if c.requires_grad]
        branch = Branch(block.body)
        # 3. Recompute once with grad: the forward's RNG, autocast, frozen statistics.
        with (
            ctx.tape.restoring(),
            ctx.autocast.restored(),
            running_stats_frozen(block.body),
            buffers_restored(ctx.mutated),
            torch.enable_grad(),
        ):
            y = ctx.tape.replay("body", branch, leaf, *_fill(ctx.template, leaves))
        # 4. One vector-Jacobian product: input, parameters, context.
        inputs = [leaf, *branch.aliases.values(), *wrt]
        found = torch.autograd.grad(y, inputs, dy, allow_unused=True)
        by_id = dict(zip([id(p) for p in branch.params], found[1:], strict=False))
        context_grads = dict(
            zip(map(id, wrt), found[1 + len(branch.params) :], strict=True)
        )
        dx = found[0] if ctx.needs_input_grad[3] else None
        d_context = [context_grads.get(id(c)) for c in leaves]
        d_params = [by_id.get(id(p)) for p in ctx.params]
        return (None, None, None, dx, *d_context, *d_params)
