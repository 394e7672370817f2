"""`check_reconstruction`: does every stage's inverse give back its input?"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from revcompile.errors import ReconstructionError
from revcompile.runtime.stage import ReversibleStage
from revcompile.runtime.state import RngTape, cuda_devices, running_stats_frozen

# Relative tolerance per stream dtype: a few hundred ulps per coupling is rounding;
# more means F or G is not the same function twice (see the causes in the error).
_RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


@dataclass(frozen=True)
class StageReconstruction:
    """How well one stage's inverse reproduced its real input."""

    path: str
    couplings: int
    dtype: torch.dtype
    max_abs_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "OVER TOLERANCE"
        return (
            f"{self.path or '<root>'}: {self.couplings} couplings, {self.dtype}, "
            f"max |x - inverse(forward(x))| = {self.max_abs_error:.3g} "
            f"(tolerance {self.tolerance:.3g}) {verdict}"
        )


def check_reconstruction(
    module: nn.Module, *inputs: Any, atol: float | None = None
) -> tuple[StageReconstruction, ...]:
    """Run `module(*inputs)`, then for every `ReversibleStage` inside it compare the
    stage's real input with ``inverse(forward(input))``.

    Leaves the module as it was: buffers (running statistics) and the global RNG state
    are restored. With ``atol=None`` the tolerance is relative to the input's magnitude
    and depends on the dtype (float64 1e-10, float32 1e-4, float16 1e-2, bfloat16 5e-2).

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
    with torch.no_grad(), running_stats_frozen(stage):
        y = stage.run_couplings(x.to(stream), context, tape.record, compute)
        with tape.restoring():
            x_rebuilt = stage.run_inverse(y, context, tape.replay, compute)
        x_rebuilt = x_rebuilt.to(x.dtype)
    err = (x - x_rebuilt).abs().max().item() if x.numel() else 0.0
    if atol is None:
        scale = x.abs().max().item() if x.numel() else 1.0
        atol = _RTOL.get(x.dtype, 1e-4) * max(1.0, scale)
    if math.isnan(err):
        err = math.inf
    return StageReconstruction(name, len(stage.couplings), x.dtype, err, atol)
