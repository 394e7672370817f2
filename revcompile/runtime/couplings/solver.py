"""Fixed-point inversion of ``y = x + f(x)``: Anderson-accelerated iteration, and the
forward's batch statistics held fixed while it iterates.

Note [Fixed-point inverse]
``x = y - f(x)`` has x as its fixed point, and plain iteration converges where f is a
contraction, at the rate of its Lipschitz constant L near x (i-ResNet's condition).
Anderson acceleration (Walker & Ni 2011) mixes the last `memory` iterates to reach the
tolerance in far fewer evaluations of f. Every evaluation must be the forward's f:
dropout masks are replayed (each call restores the recorded RNG state), autocast is
restored by the stage, and train-mode BatchNorm, whose output depends on the whole
batch, normalises with the *forward's* batch statistics (captured then, two vectors
per layer) instead of those of the current iterate; it is the same function at the
fixed point, and a simpler one (affine in each channel) away from it. The final,
differentiated evaluation at the solution is the ordinary train-mode f, so gradients
flow through the batch statistics as in storing mode. The inverse of a block has
Lipschitz constant up to 1/(1 - L), so a stage's error can grow like
``tol * sum_k prod_j 1/(1 - L_j)`` from its last block to its first.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# Solver tolerance (max |x - (y - f(x))|, relative to max(1, max |y|)) per dtype the
# branch computes in: about 100 ulps of the branch output, where rounding lets the
# iteration stall.
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


@dataclass(frozen=True)
class Solution:
    x: Tensor
    converged: bool
    iterations: int  # evaluations of f
    residual: float  # the last max |g(x) - x|, absolute


def anderson(
    g: Callable[[Tensor], Tensor],
    x: Tensor,
    atol: float,
    max_iter: int,
    memory: int,
) -> Solution:
    """Solve ``x = g(x)`` from `x` to ``max |g(x) - x| <= atol``; `memory` = 0 is
    plain (Picard) iteration."""
    history: list[tuple[Tensor, Tensor]] = []  # (g(x_k), g(x_k) - x_k)
    residual = float("inf")
    for k in range(1, max_iter + 1):
        gx = g(x)
        r = gx - x
        residual = r.abs().max().item() if r.numel() else 0.0
        if residual <= atol:
            return Solution(gx, True, k, residual)
        if residual != residual or residual == float("inf"):  # nan or inf: diverged
            break
        history = [*history[-memory:], (gx, r)] if memory else []
        x = gx if len(history) < 2 else _mix(history)
    return Solution(x, False, max_iter, residual)


def _mix(history: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Anderson's step: ``g_k - dG a`` with ``a = argmin |r_k - dR a|`` over the
    differences of consecutive iterates (a small regularised least squares, solved in
    float64; the differences stay in the stream's dtype)."""
    dg = torch.stack([b[0] - a[0] for a, b in itertools.pairwise(history)]).flatten(1)
    dr = torch.stack([b[1] - a[1] for a, b in itertools.pairwise(history)]).flatten(1)
    gram = (dr @ dr.T).double()  # (m, m)
    rhs = (dr @ history[-1][1].reshape(-1)).double()
    ridge = 1e-12 * gram.diagonal().max().clamp_min(1e-300)
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    a = torch.linalg.solve(gram + ridge * eye, rhs).to(dg.dtype)
    last = history[-1][0]
    return last - (a @ dg).reshape(last.shape)


def _batch_norms(module: nn.Module) -> list[_BatchNorm]:
    """The batch norms that normalise with the statistics of their own batch."""
    return [
        m
        for m in module.modules()
        if isinstance(m, _BatchNorm)
        and (m.training or (m.running_mean is None and m.running_var is None))
    ]


@contextmanager
def batch_stats_recorded(module: nn.Module, out: list[Tensor]) -> Iterator[None]:
    """Append ``(mean, biased var)`` of every batch-statistics norm's input to `out`."""

    def hook(m: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        like = m.weight if m.weight is not None else x  # type: ignore[union-attr]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        out.append(xf.mean(dims).to(like.dtype))
        out.append(xf.var(dims, unbiased=False).to(like.dtype))

    handles = [m.register_forward_pre_hook(hook) for m in _batch_norms(module)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def batch_stats_fixed(module: nn.Module, stats: Sequence[Tensor]) -> Iterator[None]:
    """Batch-statistics norms normalise with `stats` (as recorded) and update
    nothing: eval mode on those running buffers, for the duration."""
    norms = _batch_norms(module)
    saved = [
        (m.training, m.track_running_stats, m.running_mean, m.running_var)
        for m in norms
    ]
    try:
        for i, m in enumerate(norms):
            m.training, m.track_running_stats = False, True
            m.running_mean, m.running_var = stats[2 * i], stats[2 * i + 1]
        yield
    finally:
        for m, (training, track, mean, var) in zip(norms, saved, strict=True):
            m.training, m.track_running_stats = training, track
            m.running_mean, m.running_var = mean, var
