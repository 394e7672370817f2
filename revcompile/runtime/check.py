"""`check_reconstruction`: does every stage's inverse give back its input?"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from revcompile.errors import ReconstructionError
from revcompile.runtime.couplings.base import Unrebuildable, compute_dtype
from revcompile.runtime.guard import rebuild_error
from revcompile.runtime.stage import ReversibleStage
from revcompile.runtime.state import RngTape, cuda_devices, running_stats_frozen


@dataclass(frozen=True)
class StageReconstruction:
    """How well one stage's inverse reproduced its real input."""

    path: str
    couplings: int
    dtype: torch.dtype
    max_abs_error: float
    tolerance: float
    family: str = "additive"
    # What the stage's drift guard saw in training so far (Note [Drift guard]).
    guarded_backwards: int = 0
    anchored: int = 0
    not_converged: int = 0

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "OVER TOLERANCE"
        text = (
            f"{self.path or '<root>'}: {self.couplings} couplings, {self.dtype}, "
            f"max |x - inverse(forward(x))| = {self.max_abs_error:.3g} "
            f"(tolerance {self.tolerance:.3g}) {verdict}"
        )
        if self.guarded_backwards or self.not_converged:
            text += (
                f"; in training {self.anchored} of {self.guarded_backwards} guarded "
                f"backward(s) re-anchored, {self.not_converged} fixed-point solve(s) "
                "not converged"
            )
        return text


def check_reconstruction(
    module: nn.Module, *inputs: Any, atol: float | None = None
) -> tuple[StageReconstruction, ...]:
    """Run `module(*inputs)`, then for every `ReversibleStage` inside it compare the
    stage's real input with ``inverse(forward(input))``.

    Leaves the module as it was: buffers (running statistics) and the global RNG state
    are restored. With ``atol=None`` the tolerance is relative to the input's magnitude
    and depends on the dtype (float64 1e-10, float32 1e-4, float16 1e-2, bfloat16 5e-2)
    and on the family (a fixed_point stage allows its solver's tolerance). Each result
    also counts what the stage's drift guard saw in training (`reconstruction_log`).

    Raises:
        ReconstructionError: a stage is over tolerance; the message has the numbers.

    Example:
        >>> for r in revcompile.check_reconstruction(model, x):
        ...     print(r)
        layer1: 2 couplings, torch.float32, max |x - inverse(forward(x))| = 4.77e-07 ...
    """
    stages = [
        (n, m) for n, m in module.named_modules() if isinstance(m, ReversibleStage)
    ]
    seen: dict[str, tuple[Tensor, tuple[Any, ...]]] = {}
    handles = [m.register_forward_pre_hook(_capture(name, seen)) for name, m in stages]
    buffers = [b.clone() for b in module.buffers()]
    try:
        with torch.random.fork_rng(devices=list(cuda_devices(inputs))):
            with torch.no_grad():
                module(*inputs)
            results = tuple(
                _check_stage(name, stage, *seen[name], atol)
                for name, stage in stages
                if name in seen
            )
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in zip(module.buffers(), buffers, strict=True):
                b.copy_(saved)
    bad = [r for r in results if not r.ok]
    if bad:
        lines = "\n  ".join(str(r) for r in bad)
        raise ReconstructionError(
            f"{len(bad)} reversible stage(s) do not reconstruct their input:\n"
            f"  {lines}\n"
            "Usual causes: F or G is not deterministic outside the RNG (a custom "
            "generator, nondeterministic kernels), mutates its input in place, or the "
            "stream is in low precision with large activations. Fixes: keep the stream "
            "in float32, make in-place ops out of place, or run that stage under "
            "`revcompile.storing_activations()`."
        )
    return results


def _capture(name: str, seen: dict[str, tuple[Tensor, tuple[Any, ...]]]) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.setdefault(name, (args[0], tuple(args[1:])))

    return hook


def _check_stage(
    name: str,
    stage: ReversibleStage,
    x: Tensor,
    context: tuple[Any, ...],
    atol: float | None,
) -> StageReconstruction:
    tape = RngTape(cuda_devices((x, *context)))
    stream = stage.stream_dtype(x)
    compute = None if stream == x.dtype else x.dtype
    xs = x.to(stream)
    expected = stage.kind.enter(x, stage.layout(x))
    err, tol = math.inf, stage.tolerance(compute_dtype(x.dtype))
    with torch.no_grad(), running_stats_frozen(stage):
        carry, auxes, _ = stage.run_reversible(xs, context, tape.record, compute)
        with tape.restoring():
            try:
                stage.run_inverse(carry, auxes, context, tape.replay, compute)
                rebuilt = stage.kind.decode(carry)
            except Unrebuildable:  # a fixed-point solve that did not converge
                rebuilt = None
    if rebuilt is not None:
        # Compared in the input dtype, as the stage hands its output back in it.
        rebuilt = tuple(s.to(x.dtype) for s in rebuilt)
        err, tol = rebuild_error(rebuilt, expected, tol)
    log = stage.reconstruction_log
    return StageReconstruction(
        name,
        len(stage.couplings),
        x.dtype,
        err,
        tol if atol is None else atol,
        stage.kind.family,
        log.backwards,
        log.anchored,
        log.not_converged,
    )
