"""Vector-Jacobian products through branches and steps, for the backward steps.

Branches run with their parameters replaced by detached aliases (`Branch`), so the
inner `autograd.grad` never reaches the real parameters: their tensor hooks and DDP's
reducer see each gradient once, when the stage's function returns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from revcompile.runtime.couplings.base import Call, Coupling, State


class Branch:
    """Calls a branch with its trainable parameters replaced by detached aliases.

    Differentiating with respect to the aliases keeps the inner `autograd.grad` away
    from the real parameters, whose tensor hooks must see each gradient once: when the
    stage's function returns it, as for any other layer.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.aliases = {n: p.detach().requires_grad_(True) for n, p in named}

    def __call__(self, *args: Any) -> Tensor:
        if not self.aliases:
            return self.module(*args)
        return functional_call(self.module, self.aliases, args, strict=False)

    def vjp(
        self,
        out: Tensor,
        leaf: Tensor,
        wrt_context: Sequence[Tensor],
        grad_out: Tensor,
        grads: dict[int, Tensor],
    ) -> Tensor | None:
        """``grad_out^T d out / d (leaf, params, wrt_context)``: parameter and context
        gradients are added into `grads` by ``id()``; the leaf's is returned."""
        if not out.requires_grad:  # a branch with no trainable path to its output
            return None
        aliases = list(self.aliases.values())
        inputs = [leaf, *aliases, *wrt_context]
        found = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        keys = [id(p) for p in self.params] + [id(c) for c in wrt_context]
        accumulate(grads, keys, found[1:], grad_out)
        return found[0]


def accumulate(
    grads: dict[int, Tensor],
    keys: Sequence[int],
    found: Sequence[Tensor | None],
    grad_out: Tensor | None = None,
) -> None:
    for key, grad in zip(keys, found, strict=True):
        if grad is None:
            continue
        if grad_out is not None and _shares_storage(grad, grad_out):
            # Autograd passes grad_out through unchanged for `x + p`; the backward
            # later writes into it (Note [Rebuild in place]).
            grad = grad.clone()
        prev = grads.get(key)
        grads[key] = grad if prev is None else prev + grad


def branch_vjp(
    call: Call,
    key: str,
    module: nn.Module,
    at: Tensor,
    context: Sequence[Any],
    wrt_context: Sequence[Tensor],
    grad_out: Tensor,
    grads: dict[int, Tensor],
) -> tuple[Tensor, Tensor | None]:
    """Evaluate ``module(at, *context)`` with a graph and back-propagate `grad_out`
    through it: returns the output (detached) and the gradient reaching `at`. The
    graph is gone on return, so `at` may then be rebuilt in place."""
    leaf = at.detach().requires_grad_(True)
    branch = Branch(module)
    with torch.enable_grad():
        out = call(key, branch, leaf, *context)
    d_at = branch.vjp(out, leaf, wrt_context, grad_out, grads)
    return out.detach(), d_at


def step_vjp(
    coupling: Coupling,
    state: State,
    grad_state: Sequence[Tensor],
    context: Sequence[Any],
    wrt_context: Sequence[Tensor],
    call: Call,
    grads: dict[int, Tensor],
) -> list[Tensor]:
    """Back-propagate through `coupling.step` at a known input `state`: the generic
    backward that needs no inverse (the guard's re-anchored path in function.py)."""
    leaves = [s.detach().requires_grad_(True) for s in state]
    branches: list[Branch] = []

    def grad_call(key: str, module: nn.Module, *args: Any) -> Tensor:
        branches.append(Branch(module))
        return call(key, branches[-1], *args)

    with torch.enable_grad():
        out = coupling.step(tuple(leaves), context, grad_call)
    pairs = [(o, g) for o, g in zip(out, grad_state, strict=True) if o.requires_grad]
    aliases = [a for b in branches for a in b.aliases.values()]
    inputs = [*leaves, *aliases, *wrt_context]
    found = torch.autograd.grad(
        [o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True
    )
    keys = [id(p) for b in branches for p in b.params] + [id(c) for c in wrt_context]
    accumulate(grads, keys, found[len(leaves) :])
    return [
        torch.zeros_like(s) if g is None else g
        for s, g in zip(state, found[: len(leaves)], strict=True)
    ]


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
