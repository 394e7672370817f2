"""Shared test helpers: compare with storing mode, count saved bytes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import revcompile


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max(|b|, tiny): one number per tensor pair."""
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / max(scale, 1e-30) if a.numel() else 0.0


def run_step(
    module: nn.Module,
    inputs: tuple[Any, ...],
    *,
    storing: bool,
    seed: int = 0,
    loss_fn: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, list[Tensor | None], dict[str, Tensor | None]]:
    """One forward+backward from a fixed seed: output, input and parameter grads."""
    inputs = tuple(
        t.detach().clone().requires_grad_(t.requires_grad)
        if isinstance(t, Tensor)
        else t
        for t in inputs
    )
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if storing:
        with revcompile.storing_activations():
            out = module(*inputs)
    else:
        out = module(*inputs)
    # A loss that weights every element differently, so no gradient is accidentally 0.
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    loss = loss_fn(out) if loss_fn else (out * weight).sum()
    loss.backward()
    in_grads = [t.grad if isinstance(t, Tensor) else None for t in inputs]
    params = {n: p.grad for n, p in module.named_parameters()}
    return out.detach(), in_grads, params


def assert_matches_storing(
    module: nn.Module, *inputs: Any, rtol: float, seed: int = 0
) -> nn.Module:
    """Reversible vs storing mode on two identical copies: outputs, input gradients and
    every parameter gradient agree within `rtol`; buffers end equal. Returns the
    reversible copy."""
    rev, ref = module, copy.deepcopy(module)
    out_r, in_r, p_r = run_step(rev, inputs, storing=False, seed=seed)
    out_s, in_s, p_s = run_step(ref, inputs, storing=True, seed=seed)
    assert rel_err(out_r, out_s) <= rtol, ("output", rel_err(out_r, out_s))
    for i, (a, b) in enumerate(zip(in_r, in_s, strict=True)):
        assert (a is None) == (b is None), f"input {i}: grad presence differs"
        if a is not None:
            assert rel_err(a, b) <= rtol, (f"input {i}", rel_err(a, b))
    assert p_r.keys() == p_s.keys()
    for name in p_r:
        a, b = p_r[name], p_s[name]
        assert (a is None) == (b is None), f"{name}: grad presence differs"
        if a is not None:
            assert rel_err(a, b) <= rtol, (name, rel_err(a, b))
    for (name, a), (_, b) in zip(rev.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.equal(a, b), f"buffer {name} differs"
    return rev


def saved_bytes(forward: Callable[[], Tensor]) -> int:
    """Bytes autograd saves for backward while `forward` runs (parameters excluded):
    what a training step holds between its forward and its backward. Transient graphs
    that a reversible backward builds and frees one coupling at a time are not counted;
    the peak-memory tests see them."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        if not isinstance(t, nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    out.sum().backward()  # the graph is consumed after counting: nothing leaks
    return total
