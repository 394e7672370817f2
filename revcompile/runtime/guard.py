"""The drift guard: a stage that also saves its input checks what backward rebuilt.

Note [Drift guard]
Reconstruction is exact only if every branch computes the same function twice. A
branch that reads state outside the RNG (a counter, its own generator), kernels that
are not deterministic, a family whose inverse amplifies rounding (momentum or scaled
in float arithmetic), or a fixed-point solve that does not converge break that, and
the gradients computed on the drifted values are wrong without any error. Under
`guard=True` a stage also saves its input (one tensor per stage, flat in depth), and
backward compares the input it rebuilt with it. Above the tolerance it warns
(`ReconstructionWarning`) and re-anchors: it runs the stage forward again from the
saved input without a graph, keeping each coupling's input state, and back-propagates
through each coupling's differentiable step at those states (`step_vjp`), so the
gradients are storing mode's. That costs one more forward and holds one state per
coupling, but only on the steps that drifted. Every guarded backward is counted in
`stage.reconstruction_log` (errors, re-anchors, fixed-point solves that failed), and
`check_reconstruction` summarises it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from revcompile.runtime.couplings.base import Call, ReconstructionWarning, State
from revcompile.runtime.couplings.vjp import step_vjp

if TYPE_CHECKING:
    from revcompile.runtime.stage import ReversibleStage


@dataclass(frozen=True)
class StepReconstruction:
    """What one backward of a guarded stage found."""

    max_abs_error: float  # max |saved input - rebuilt input|; inf if not rebuilt
    tolerance: float
    anchored: bool  # the gradients were computed from the saved input
    reason: str = ""  # why it re-anchored, empty when it did not

    def __str__(self) -> str:
        verdict = f"re-anchored: {self.reason}" if self.anchored else "ok"
        return (
            f"max |x - rebuilt x| = {self.max_abs_error:.3g} "
            f"(tolerance {self.tolerance:.3g}) {verdict}"
        )


@dataclass
class ReconstructionLog:
    """Counts over a stage's guarded (or failed) backward passes."""

    backwards: int = 0
    anchored: int = 0
    not_converged: int = 0  # fixed-point solves that hit their iteration cap
    max_abs_error: float = 0.0
    last: StepReconstruction | None = None
    failures: list[str] = field(default_factory=list)  # the last few reasons

    def add(self, step: StepReconstruction, not_converged: bool) -> None:
        self.backwards += 1
        self.anchored += step.anchored
        self.not_converged += not_converged
        if not math.isnan(step.max_abs_error):
            self.max_abs_error = max(self.max_abs_error, step.max_abs_error)
        self.last = step
        if step.reason:
            self.failures = [*self.failures[-4:], step.reason]

    def __str__(self) -> str:
        text = (
            f"{self.backwards} guarded backward(s), {self.anchored} re-anchored, "
            f"max error {self.max_abs_error:.3g}"
        )
        if self.not_converged:
            text += f", {self.not_converged} fixed-point solve(s) not converged"
        return text


def rebuild_error(
    rebuilt: State, expected: State, tolerance: float
) -> tuple[float, float]:
    """``(max |rebuilt - expected|, absolute tolerance)``; the tolerance is relative
    to the expected values' magnitude (at least 1), as in `check_reconstruction`."""
    err, scale = 0.0, 0.0
    for a, b in zip(rebuilt, expected, strict=True):
        if b.numel():
            e = (a.to(b.dtype) - b).abs().max().item()
            # max() would drop a nan (every comparison with it is false): a rebuild
            # that produced nan or inf is the worst error, never a perfect one.
            err = max(err, math.inf if math.isnan(e) else e)
            scale = max(scale, b.abs().max().item())
    return err, tolerance * max(1.0, scale)


def check_rebuilt(
    stage: ReversibleStage,
    rebuilt: State | None,
    x: Tensor,
    dtype: torch.dtype,
    failure: str,
) -> StepReconstruction:
    """Compare the rebuilt input state with the saved input's; warn if re-anchoring."""
    layout = stage.layout(x)
    expected = stage.kind.enter(x, layout)
    tol = stage.tolerance(dtype)
    if rebuilt is None:
        err, atol = math.inf, tol
    else:
        err, atol = rebuild_error(rebuilt, expected, tol)
    reason = failure or (f"drift {err:.3g} > {atol:.3g}" if err > atol else "")
    step = StepReconstruction(err, atol, anchored=bool(reason), reason=reason)
    stage.reconstruction_log.add(step, not_converged=bool(failure))
    if reason:
        warnings.warn(
            ReconstructionWarning(
                f"{stage.describe()} rebuilt its input with max error {err:.3g} "
                f"(tolerance {atol:.3g}, {dtype}): {reason}. Its gradients this step "
                "come from the saved input (the guard re-anchored). If this repeats, "
                "see stage.reconstruction_log; usual causes are a branch that is "
                "not the same function twice (state outside the RNG, in-place "
                "updates), a momentum/scaled stage in float arithmetic "
                "(exact=False), or a fixed-point block that is not contractive."
            ),
            stacklevel=2,
        )
    return step


def record_failure(stage: ReversibleStage, failure: str) -> None:
    """Count a backward that could not rebuild and had no saved input to use."""
    step = StepReconstruction(math.inf, math.nan, anchored=False, reason=failure)
    stage.reconstruction_log.add(step, not_converged=True)


def anchored_backward(
    stage: ReversibleStage,
    x: Tensor,
    dy: Tensor,
    context: Sequence[Any],
    wrt_context: Sequence[Tensor],
    calls: Sequence[Call],
    grads: dict[int, Tensor],
) -> Tensor:
    """Gradients from the saved input: forward again without a graph keeping each
    coupling's input state, then back-propagate through each step at its state.
    `calls[i]` replays coupling i's RNG draws; the caller has frozen running stats."""
    layout = stage.layout(x)
    kind = stage.kind
    states: list[State | None] = []
    # 1. Replay the forward from the saved input, keeping every coupling's input.
    with torch.no_grad():
        state = kind.enter(x, layout)
        for c, call in zip(stage.couplings, calls, strict=True):
            states.append(state)
            state = c.step(state, context, call)  # type: ignore[operator]
    del state
    # 2. Back-propagate from the exit through each step, last first.
    d_state, dx_exit = kind.leave_grad(dy, layout)
    for i in reversed(range(len(stage.couplings))):
        at = states[i]
        assert at is not None
        states[i] = None  # one state freed per coupling
        d_state = step_vjp(
            stage.couplings[i],  # type: ignore[arg-type]
            at,
            d_state,
            context,
            wrt_context,
            calls[i],
            grads,
        )
    # 3. Through the entry map.
    dx = kind.enter_grad(d_state, layout)
    return dx if dx_exit is None else dx + dx_exit
