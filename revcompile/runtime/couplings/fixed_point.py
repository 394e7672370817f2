"""Residual blocks kept exactly as they are, inverted by fixed-point iteration (RevUp,
i-ResNet): ``coupling="fixed_point"``.

No split and no change of function: block k stays ``y = x + f_k(x)`` (optionally
followed by a LayerNorm, ``y = LN(x + f_k(x))``, as in post-norm encoders). Backward
rebuilds x from y by iterating ``x <- y - f(x)`` with Anderson acceleration to a
tolerance (Note [Fixed-point inverse] in solver.py); it converges where f is
contractive near x. A post-join LayerNorm is inverted exactly from the per-row mean
and reciprocal std the forward saves (two numbers per row: 2 / C of the stream per
block). A block that does not converge raises `Unrebuildable`, and the stage,
guarded by default for this family, re-anchors on its saved input: the gradients are
then storing mode's, never silently wrong, and `stage.reconstruction_log` counts it.
Build as

    ReversibleStage([FixedPointCoupling(block.branch) for block in blocks])
    ReversibleStage([FixedPointCoupling(layer.branch, norm=layer.norm) ...])

and let the conversion pass decide per block with `probe_fixed_point(f, x, ...)`.
Defaults: tolerance per compute dtype (solver.TOLERANCE: float64 1e-9 relative), at
most 50 evaluations of f per block, Anderson memory 5. Reconstruction error: the
solver's tolerance, amplified by up to 1/(1 - L) per block going back through the
stage; never bit-exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from revcompile.errors import ConversionError
from revcompile.runtime.couplings.base import (
    RTOL,
    Aux,
    Call,
    Carry,
    Coupling,
    Layout,
    State,
    Unrebuildable,
    compute_dtype,
    keyed_call,
)
from revcompile.runtime.couplings.solver import (
    TOLERANCE,
    anderson,
    batch_stats_fixed,
    batch_stats_recorded,
)
from revcompile.runtime.couplings.vjp import branch_vjp
from revcompile.runtime.state import RngTape, cuda_devices, running_stats_frozen


class FixedPointCoupling(Coupling):
    """``y = x + f(x)`` (then `norm`, a LayerNorm, if given), inverted iteratively.

    Args:
        f: the block's own branch, ``(x, *context) -> tensor shaped like x``.
        norm: an ``nn.LayerNorm`` applied after the join, or None.
        tol: solver tolerance relative to ``max(1, max |y|)``; None: per dtype.
        max_iter: most evaluations of f per block and backward.
        memory: Anderson history length; 0 for plain iteration.
    """

    family = "fixed_point"
    splits = False
    guard_default = True

    def __init__(
        self,
        f: nn.Module,
        norm: nn.LayerNorm | None = None,
        *,
        tol: float | None = None,
        max_iter: int = 50,
        memory: int = 5,
    ) -> None:
        super().__init__()
        if norm is not None and not isinstance(norm, nn.LayerNorm):
            raise ConversionError(
                f"FixedPointCoupling inverts a post-join nn.LayerNorm, got "
                f"{type(norm).__name__}."
            )
        if max_iter < 1 or memory < 0:
            raise ConversionError("max_iter must be >= 1 and memory >= 0.")
        self.f = f
        self.norm = norm
        self.tol, self.max_iter, self.memory = tol, max_iter, memory
        self.last_iterations = 0  # evaluations of f in the last solve

    def extra_repr(self) -> str:
        return f"tol={self.tol}, max_iter={self.max_iter}, memory={self.memory}"

    def solver_tolerance(self, dtype: torch.dtype) -> float:
        return self.tol if self.tol is not None else TOLERANCE.get(dtype, 1e-5)

    def tolerance(self, dtype: torch.dtype) -> float:
        return max(RTOL.get(dtype, 1e-4), 10 * self.solver_tolerance(dtype))

    @classmethod
    def enter(cls, x: Tensor, layout: Layout) -> State:
        return (x,)

    @classmethod
    def enter_grad(cls, grads: Sequence[Tensor], layout: Layout) -> Tensor:
        return grads[0]

    @classmethod
    def leave(cls, state: State, x: Tensor, layout: Layout) -> Tensor:
        return state[0]

    @classmethod
    def leave_grad(cls, dy: Tensor, layout: Layout) -> tuple[list[Tensor], None]:
        return [dy], None

    def step(self, state: State, context: Sequence[Any], call: Call) -> State:
        (x,) = state
        z = x + call("f", self.f, x, *context)
        return (z if self.norm is None else call("norm", self.norm, z).to(z.dtype),)

    def forward_step(self, carry: Carry, context: Sequence[Any], call: Call) -> Aux:
        (x,) = carry.values
        stats: list[Tensor] = []
        with batch_stats_recorded(self.f, stats):
            z = x + call("f", self.f, x, *context)
        if self.norm is None:
            carry.values = [z]
            return tuple(stats)
        # (..., C) -> 2 x (..., 1): the norm's input per row, to invert it later.
        dims = tuple(range(-len(self.norm.normalized_shape), 0))
        mean = z.mean(dims, keepdim=True)
        rstd = torch.rsqrt(z.var(dims, unbiased=False, keepdim=True) + self.norm.eps)
        carry.values = [call("norm", self.norm, z).to(z.dtype)]
        return (mean, rstd, *stats)

    def _denorm(self, y: Tensor, aux: Aux) -> tuple[Tensor, Aux]:
        """The norm's input from its output and the saved row statistics; and the
        batch statistics that follow them in `aux`."""
        if self.norm is None:
            return y, aux
        mean, rstd, *stats = aux
        z = y
        if self.norm.bias is not None:
            z = z - self.norm.bias.detach().to(y.dtype)
        if self.norm.weight is not None:
            z = z / self.norm.weight.detach().to(y.dtype)
        return z / rstd + mean, tuple(stats)

    def _solve(
        self, z: Tensor, stats: Aux, context: Sequence[Any], call: Call
    ) -> Tensor:
        """x with ``x + f(x) = z`` (Note [Fixed-point inverse])."""

        def g(x: Tensor) -> Tensor:
            with torch.no_grad(), batch_stats_fixed(self.f, stats):
                return z - call("f", self.f, x, *context).to(z.dtype)

        dtype = compute_dtype(z.dtype)
        scale = max(1.0, z.abs().max().item()) if z.numel() else 1.0
        atol = self.solver_tolerance(dtype) * scale
        solution = anderson(g, z, atol, self.max_iter, self.memory)
        self.last_iterations = solution.iterations
        if not solution.converged:
            raise Unrebuildable(
                f"a fixed-point block did not converge: max |x - (y - f(x))| = "
                f"{solution.residual:.3g} after {solution.iterations} evaluations "
                f"(tolerance {atol:.3g}); its branch is not contractive enough here"
            )
        return solution.x

    def inverse_step(
        self, carry: Carry, aux: Aux, context: Sequence[Any], call: Call
    ) -> None:
        z, stats = self._denorm(carry.values[0], aux)
        carry.values = [self._solve(z, stats, context, call)]

    def backward_step(
        self,
        carry: Carry,
        aux: Aux,
        context: Sequence[Any],
        wrt_context: Sequence[Tensor],
        call: Call,
        grads: dict[int, Tensor],
    ) -> None:
        z, stats = self._denorm(carry.values[0], aux)
        dz = carry.grads[0]
        # 1. Through the post-join norm, at its rebuilt input.
        if self.norm is not None:
            _, dz = branch_vjp(call, "norm", self.norm, z, (), (), dz, grads)
            assert dz is not None
        # 2. x from z = x + f(x), iterating with the forward's batch statistics.
        x = self._solve(z, stats, context, call)
        # 3. f(x) with a graph, in train mode; dx = dz + J_f(x)^T dz.
        _, dx_f = branch_vjp(call, "f", self.f, x, context, wrt_context, dz, grads)
        carry.values = [x]
        carry.start_backward([dz if dx_f is None else dz + dx_f])


@dataclass(frozen=True)
class FixedPointProbe:
    """Whether a block's fixed-point inverse converges on a real input, and how fast."""

    converged: bool
    iterations: int  # evaluations of f the backward's solver needed (or its cap)
    error: float  # max |rebuilt x - x| / max(1, max |x|)
    contraction: float  # estimated Lipschitz constant of x -> y - f(x) near x
    tolerance: float  # the solver tolerance used (relative)

    def __str__(self) -> str:
        verdict = "converges" if self.converged else "does NOT converge"
        return (
            f"{verdict} in {self.iterations} evaluations of f (tolerance "
            f"{self.tolerance:.3g}); error {self.error:.3g}; contraction "
            f"{self.contraction:.3g}"
        )


def probe_fixed_point(
    f: nn.Module,
    x: Tensor,
    *context: Any,
    norm: nn.LayerNorm | None = None,
    tol: float | None = None,
    max_iter: int = 50,
    memory: int = 5,
    picard_steps: int = 6,
) -> FixedPointProbe:
    """Run the backward's solver on one block and a real input; never raises on
    non-convergence. Leaves `f` (running statistics, buffers) and the RNG as they
    were. `contraction` is the geometric mean of the ratio of successive residuals
    over `picard_steps` plain iterations: about L, the rate plain iteration has.

    Example:
        >>> probe = probe_fixed_point(nn.Linear(8, 8), torch.randn(4, 8))
        >>> probe.converged, probe.contraction < 1
        (True, True)
    """
    block = FixedPointCoupling(f, norm, tol=tol, max_iter=max_iter, memory=memory)
    buffers = [b.clone() for b in f.buffers()]
    tape = RngTape(cuda_devices((x, *context)))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=list(tape.devices)):
            carry = Carry((x,))
            aux = block.forward_step(carry, context, keyed_call(tape.record, 0))
            y = carry.values[0]
            with running_stats_frozen(f):
                z, stats = block._denorm(y, aux)
                replay = keyed_call(tape.replay, 0)
                try:
                    rebuilt = block._solve(z, stats, context, replay)
                    converged = True
                except Unrebuildable:
                    rebuilt, converged = None, False
                iterations = block.last_iterations
                contraction = _contraction(
                    block, z, stats, context, replay, picard_steps
                )
    finally:
        with torch.no_grad():
            for b, saved in zip(f.buffers(), buffers, strict=True):
                b.copy_(saved)
    scale = max(1.0, x.abs().max().item()) if x.numel() else 1.0
    error = (
        float("inf") if rebuilt is None else (rebuilt - x).abs().max().item() / scale
    )
    dtype = compute_dtype(x.dtype)
    return FixedPointProbe(
        converged, iterations, error, contraction, block.solver_tolerance(dtype)
    )


def _contraction(
    block: FixedPointCoupling,
    z: Tensor,
    stats: Aux,
    context: Sequence[Any],
    call: Call,
    steps: int,
) -> float:
    x, norms = z, []
    for _ in range(steps):
        with batch_stats_fixed(block.f, stats):
            nxt = z - call("f", block.f, x, *context).to(z.dtype)
        norms.append((nxt - x).abs().max().item())
        x = nxt
    ratios = [b / a for a, b in itertools.pairwise(norms) if a > 0]
    if not ratios:
        return 0.0
    return float(torch.tensor(ratios).log().mean().exp())
