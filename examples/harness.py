"""What both fine-tuning examples share: peak memory, step time, progress, output.

Not part of revcompile: the examples print, the library never does.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console, Group, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import revcompile
from revcompile.passes.ir import Plan
from revcompile.report import format_bytes, stages_table

Step = Callable[[], Any]


class _LiveTensors(TorchDispatchMode):
    """Peak bytes of tensor storages created while active and still alive.

    CPU has no allocator statistics, and the process's peak RSS cannot be reset here
    without changing malloc's behaviour for the whole run. Every op's outputs pass
    through a dispatch mode, backward and a reversible stage's recompute included, so
    counting the storages they create, and dropping each when a weak reference says it
    was freed, gives the peak of tensor memory. Buffers an op allocates and frees
    inside itself are not seen: the figure is a lower bound, the same for both models.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._created(t)
        return out

    def _created(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        size, key = storage.nbytes(), storage.data_ptr()
        seen = self.live.get(key)
        if size == 0 or (seen is not None and not seen[0].expired()):
            return  # a view or an in-place result: no new memory
        for k, (ref, n) in list(self.live.items()):
            if ref.expired():
                del self.live[k]
                self.now -= n
        self.live[key] = (StorageWeakRef(storage), size)
        self.now += size
        self.peak = max(self.peak, self.now)


def peak_memory(step: Step, device: torch.device) -> int:
    """Bytes allocated at the peak of `step`, above what was allocated before it.

    Run `step` once before measuring, so that gradients and optimizer state already
    exist: the figure is then the step's activations and temporaries.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with _LiveTensors() as live:
        step()
    return live.peak


def step_times(steps: dict[str, Step], rounds: int, device: torch.device) -> dict:
    """Median seconds of each step, taking turns so that a busy neighbour on a shared
    machine slows every step alike; the first round warms up and is dropped."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds + 1):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def saved_bytes(forward: Callable[[], Tensor]) -> int:
    """Bytes of the tensors autograd keeps from `forward` for the backward, parameters
    excluded, each storage once: the activation memory a reversible stage stops
    storing. Backward then runs, so that the graph is freed."""
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if not isinstance(t, nn.Parameter):
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    return sum(saved.values())


def measure(
    models: dict[str, nn.Module],
    loss: Callable[[nn.Module], Tensor],
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    rounds: int,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """One training step of each model, on copies, with the same loss and optimizer:
    median time of the whole step; peak and saved memory of its forward and backward
    (the optimizer update allocates the same for every model and would hide the
    difference)."""
    steps, passes, forwards = {}, {}, {}
    for name, model in models.items():
        model = copy.deepcopy(model).train()
        opt = optimizer(model.parameters())

        def forward(model: nn.Module = model) -> Tensor:
            return loss(model)

        def fwd_bwd(forward: Step = forward, opt: Any = opt) -> None:
            opt.zero_grad(set_to_none=False)  # gradients accumulate in place
            forward().backward()

        def step(fwd_bwd: Step = fwd_bwd, opt: Any = opt) -> None:
            fwd_bwd()
            opt.step()

        step()  # gradients and optimizer state exist from here on
        steps[name], passes[name], forwards[name] = step, fwd_bwd, forward
    times = step_times(steps, rounds, device)
    return {
        name: {
            "step_s": seconds,
            "peak_bytes": float(peak_memory(passes[name], device)),
            "saved_bytes": float(saved_bytes(forwards[name])),
        }
        for name, seconds in times.items()
    }


class Storing(nn.Module):
    """`model` with its stages under plain autograd: the same couplings, every
    activation stored. Only the forward needs the switch; backward then follows the
    graph autograd recorded."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with revcompile.storing_activations():
            return self.model(*args, **kwargs)


def plan_record(plan: Plan) -> dict[str, Any]:
    """What converted, and every kept block with its Reason, for --json."""
    return {
        "summary": plan.summary(),
        "converted": len(plan.converted),
        "blocks": len(plan.blocks),
        "kept": [
            {"block": b.module_path, "kind": b.reason.kind.value, "why": str(b.reason)}
            for b in plan.blocks
            if b.reason is not None
        ],
    }


def calibration_skip(coupling: str, plan: Plan, default: Plan) -> str | None:
    """Why `revcompile.calibrate` does not apply, or None where it does.

    calibrate re-plans the original with the default options to find each stage's
    inputs and outputs, so it needs the same stages as the default coupling's plan
    `default`; and a fixed_point stage computes its blocks exactly already.
    """
    if not plan.stages:
        return "nothing converted"
    if coupling == "fixed_point":
        return "fixed_point keeps every converted block's function: nothing to fit"

    def spans(p: Plan) -> list[tuple[Any, ...]]:
        return [(s.scope, s.input, s.output, s.blocks) for s in p.stages]

    if spans(plan) != spans(default):
        return f"{coupling}'s stages differ from the default plan calibrate re-traces"
    return None


def calibrates(
    asked: bool, coupling: str, plan: Plan, default: Plan, console: Console,
    results: dict[str, Any],
) -> bool:  # fmt: skip
    """Whether to run calibrate: asked for and applicable; says why not where not."""
    skip = calibration_skip(coupling, plan, default) if asked else None
    if skip:
        console.print(f"calibrate skipped: {skip}")
        results["calibration_skipped"] = skip
    return asked and not skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress() -> Progress:
    """rich progress bars: what is being done, steps, elapsed and remaining time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


def plan_summary(plan: Plan) -> RenderableType:
    """What was converted: the stage table and the plan's one line."""
    parts: list[RenderableType] = []
    if plan.stages:
        parts.append(stages_table(plan))
    parts.append(Text(plan.summary(), style="bold"))
    return Group(*parts)


def cost_cells(
    mine: dict[str, float], base: dict[str, float], relative: bool
) -> list[str]:
    """Peak memory, saved memory and step time, with ratios to `base` if asked."""
    cells = [
        format_bytes(int(mine["peak_bytes"])),
        format_bytes(int(mine["saved_bytes"])),
        f"{mine['step_s'] * 1000:.0f} ms",
    ]
    if relative:
        keys = ("peak_bytes", "saved_bytes", "step_s")
        pairs = zip(cells, keys, strict=True)
        cells = [f"{c} ({ratio(mine[k], base[k])})" for c, k in pairs]
    return cells


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def check_finite(results: dict[str, Any]) -> list[str]:
    """Paths of numbers in `results` that are not finite (NaN, inf)."""
    bad = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif isinstance(value, float) and not math.isfinite(value):
            bad.append(path)

    walk(results, "")
    return bad


def finish(
    console: Console, summary: RenderableType, results: dict[str, Any], path: str | None
) -> int:
    """Print the summary, write every figure to `path` (JSON) if given, and return
    the exit status: 1 if any figure is not finite."""
    console.print(summary)
    bad = check_finite(results)
    results["finite"] = not bad
    if path:
        Path(path).write_text(json.dumps(results, indent=2) + "\n")
    if bad:
        console.print(f"[red]not finite: {', '.join(bad)}")
        return 1
    return 0


def batched(items: Iterable[Any], n: int) -> list[list[Any]]:
    chunk: list[Any] = []
    out = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            out.append(chunk)
            chunk = []
    if chunk:
        out.append(chunk)
    return out
