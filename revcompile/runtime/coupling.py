"""The additive coupling (RevNet, Gomez et al. 2017) and its reconstructing backward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

# `call(key, module, *args)` runs `module(*args)`; the stage passes one that records or
# replays RNG state under `key` (see Note [Exactly once] in state.py).
Call = Callable[..., Tensor]


# `recorder(key, module, *args)` likewise, with the coupling index in the key.
Recorder = Callable[..., Tensor] | None


def plain_call(key: str, module: nn.Module, *args: Any) -> Tensor:
    return module(*args)


def keyed_call(
    recorder: Recorder, index: int, compute: torch.dtype | None = None
) -> Call:
    """A `Call` that hands ``((index, key), module, half, *args)`` to `recorder`,
    first casting the stream half to `compute` (Note [Float64 stream] in stage.py)."""

    def call(key: str, module: nn.Module, half: Tensor, *args: Any) -> Tensor:
        if compute is not None:
            half = half.to(compute)
        if recorder is None:
            return module(half, *args)
        return recorder((index, key), module, half, *args)

    return call


class AdditiveCoupling(nn.Module):
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

    def __init__(self, F: nn.Module, G: nn.Module) -> None:
        super().__init__()
        self.F = F
        self.G = G

    def forward(self, x1: Tensor, x2: Tensor, *context: Any) -> tuple[Tensor, Tensor]:
        return self.step(x1, x2, context, plain_call)

    def step(
        self, x1: Tensor, x2: Tensor, context: Sequence[Any], call: Call
    ) -> tuple[Tensor, Tensor]:
        y1 = x1 + call("F", self.F, x2, *context)
        y2 = x2 + call("G", self.G, y1, *context)
        return y1, y2

    def inverse(self, y1: Tensor, y2: Tensor, *context: Any) -> tuple[Tensor, Tensor]:
        return self.inverse_step(y1, y2, context, plain_call)

    def inverse_step(
        self, y1: Tensor, y2: Tensor, context: Sequence[Any], call: Call
    ) -> tuple[Tensor, Tensor]:
        x2 = y2 - call("G", self.G, y1, *context)
        x1 = y1 - call("F", self.F, x2, *context)
        return x1, x2

    def backward_step(
        self,
        carry: Carry,
        context: Sequence[Any],
        wrt_context: Sequence[Tensor],
        call: Call,
        grads: dict[int, Tensor],
    ) -> None:
        """Rebuild ``(x1, x2)`` from ``(y1, y2)`` and back-propagate ``(dy1, dy2)``.

        RevNet's Algorithm 1: G and F each run once, with grad, on rebuilt values; the
        same evaluations serve the inverse and the vector-Jacobian products. `carry`
        moves one coupling earlier; gradients of the parameters of F and G and of the
        tensors in `wrt_context` are added into `grads`, keyed by ``id()``.
        """
        # 1. z1 = y1 as a fresh leaf; g = G(z1) with a graph.
        z1 = carry.y1.detach().requires_grad_(True)
        g_branch = _Branch(self.G)
        with torch.enable_grad():
            g = call("G", g_branch, z1, *context)
        # 2. x2 = y2 - G(y1): G's input gradient and parameter gradients from dy2.
        dz1 = g_branch.vjp(g, z1, wrt_context, carry.dy2, grads)
        del z1  # G's graph is gone: y1 may now change in place
        carry.update("y2", g.detach(), subtract=True)  # y2 is now x2
        del g
        carry.update("dy1", dz1)  # the total gradient reaching y1
        # 3. f = F(x2) with a graph, on the rebuilt x2.
        x2_leaf = carry.y2.detach().requires_grad_(True)
        f_branch = _Branch(self.F)
        with torch.enable_grad():
            f = call("F", f_branch, x2_leaf, *context)
        # 4. x1 = y1 - F(x2): F's gradients from the total gradient reaching y1.
        dx2_f = f_branch.vjp(f, x2_leaf, wrt_context, carry.dy1, grads)
        del x2_leaf
        carry.update("y1", f.detach(), subtract=True)
        del f
        carry.update("dy2", dx2_f)


class Carry:
    """The stage's two halves and their gradients between couplings in backward.

    Note [Rebuild in place]
    Reconstruction writes each coupling's input over its output (``y2 -= G(y1)``) and
    each gradient over the one it extends, so backward holds one generation of the
    four halves rather than two: at C=64, 32x32, batch 32 this took the peak of a
    stage from 72 to 64 MiB (benchmarks/stage.py). Only tensors the backward
    allocated itself are written: the saved stage output may still be held by the
    caller, and the incoming gradient belongs to autograd; the first coupling (last in
    the stage) copies instead.
    """

    def __init__(self, y1: Tensor, y2: Tensor, dy1: Tensor, dy2: Tensor) -> None:
        self.y1, self.y2, self.dy1, self.dy2 = y1, y2, dy1, dy2
        self.owned: set[str] = set()

    def update(self, name: str, delta: Tensor | None, subtract: bool = False) -> None:
        """``name += delta`` (or ``-=``): in place if this backward owns the tensor."""
        if delta is None:
            return
        value = getattr(self, name)
        if name in self.owned and value.shape == torch.broadcast_shapes(
            value.shape, delta.shape
        ):
            value.sub_(delta) if subtract else value.add_(delta)
            return
        setattr(self, name, value - delta if subtract else value + delta)
        self.owned.add(name)


class _Branch:
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
        for key, grad in zip(keys, found[1:], strict=True):
            if grad is not None:
                if _shares_storage(grad, grad_out):
                    # Autograd passes grad_out through unchanged for `x + p`; the
                    # backward later writes into it (Note [Rebuild in place]).
                    grad = grad.clone()
                prev = grads.get(key)
                grads[key] = grad if prev is None else prev + grad
        return found[0]


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
