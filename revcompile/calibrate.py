"""Fit each reversible stage of a converted model to the original stage it replaces.

Note [Calibration]
A coupling is a different function from the residual blocks it replaces (Note [Slice,
don't pad], Note [Glue inside a stage]), so a converted pretrained model starts
fine-tuning from a loss well above the original's. Every stage maps the same input to
a tensor of the same shape as the span of the original graph it replaced (plan stage
``input`` -> ``output``), so each can be fitted on its own: run the original on a few
batches, record every stage's input, context and output, and minimise the relative
squared error ``|stage(x) - y|^2 / |y|^2`` over the stage's parameters with Adam.

Each stage is fitted on the original's inputs (teacher forcing), not on what the
converted stages before it produce: the stages are independent, errors do not compound
during the fit, and the cost is a few forward and backward passes of each stage.

Modes. The original runs in eval mode: the targets are the function the pretrained
model computes at inference (a graph traced by torch.export keeps the batch-norm mode
it was traced in). While a stage is fitted, its batch norms use batch statistics, as in
training, and everything else in it (dropout) runs in eval mode, since noise only slows
a regression. The converted function has other activation statistics than the
original (an F sees half the channels it used to), so afterwards every batch norm of
the stage gets running statistics recomputed on the calibration batches for the fitted
weights. The converted model's train/eval modes are restored at the end.

Recomputing the statistics assumes that the original's running statistics describe the
calibration batches, as a trained model's do. Where they do not (a model trained for a
few steps, other data), the fitted stage can end further from the original in eval mode
than it started; such a fit is undone, and the report says so.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from revcompile.errors import ConversionError
from revcompile.passes.calls import record_calls
from revcompile.passes.capture import capture
from revcompile.passes.inputs import normalise
from revcompile.passes.ir import Plan
from revcompile.passes.options import LeafSpec, Options
from revcompile.passes.pipeline import analyze_model
from revcompile.runtime.mode import storing_activations

_BatchNorm = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class StageFit:
    """One stage's relative squared error on the calibration batches, in eval mode."""

    module: str  # the stage's name in the converted model, e.g. ``rev_layer1_0``
    before: float  # |stage(x) - y|^2 / |y|^2 before fitting
    after: float  # the same after fitting and recomputing batch-norm statistics
    undone: bool = False  # the fit made it worse, so the stage was put back


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` did: per-stage errors, the batches and steps, the time."""

    stages: tuple[StageFit, ...]
    batches: int
    steps: int
    seconds: float

    def summary(self) -> str:
        """One line, e.g. ``4 stages fitted on 8 batches in 3.1 s; relative error
        0.41 -> 0.02 (mean)``."""
        n = len(self.stages)
        before = sum(s.before for s in self.stages) / max(n, 1)
        after = sum(s.after for s in self.stages) / max(n, 1)
        undone = sum(s.undone for s in self.stages)
        return (
            f"{n} stage{'' if n == 1 else 's'} fitted on {self.batches} batches, "
            f"{self.steps} steps each, in {self.seconds:.1f} s; relative error "
            f"{before:.3g} -> {after:.3g} (mean over stages)"
            + (f"; {undone} fit{'' if undone == 1 else 's'} undone" if undone else "")
        )


def calibrate(
    converted: nn.Module,
    original: nn.Module,
    batches: Iterable[Any],
    *,
    steps: int = 50,
    lr: float = 1e-3,
    leaf_modules: Iterable[LeafSpec] = (),
) -> Calibration:
    """Fit every reversible stage of `converted` to reproduce `original`'s stage.

    A cheap warm start before fine-tuning (Note [Calibration] in this file): each stage
    is fitted in place, on its own, to the outputs the original computes for the same
    stage inputs, then its batch-norm statistics are recomputed. Only the stages'
    parameters change; the rest of `converted` and `original` stay as they are.

    Args:
        converted: the result of ``revcompile.convert(original, ...)``.
        original: the model it was converted from, with the same weights.
        batches: a few input batches, each in a form ``example_inputs`` accepts: a
            tensor, a tuple of positional tensors or a dict of keyword tensors.
            All are held in memory, with every stage's input and output for them.
        steps: Adam steps per stage, cycling through the batches; 0 only recomputes
            the batch-norm statistics.
        lr: Adam's learning rate.
        leaf_modules: as given to `revcompile.convert`, so that the original traces
            into the same graph.

    Returns:
        A frozen `Calibration` with each stage's error before and after.

    Raises:
        ConversionError: `converted` is no ``revcompile.convert`` result, `batches`
            is empty, or the original does not trace into the graph that was
            converted.

    Example:
        >>> converted = revcompile.convert(model, (x[:2],))
        >>> report = revcompile.calibrate(converted, model, [x[:32], x[32:64]])
        >>> print(report.summary())
    """
    plan = getattr(converted, "revcompile_plan", None)
    builds = getattr(converted, "revcompile_builds", None)
    if plan is None or builds is None:
        raise ConversionError(
            "calibrate() needs the model revcompile.convert() returned (it carries "
            "revcompile_plan and revcompile_builds)."
        )
    batches = list(batches)
    if not batches:
        raise ConversionError("calibrate() needs at least one batch of inputs.")
    if steps < 0:
        raise ConversionError(f"steps must be >= 0, not {steps}")
    start = time.perf_counter()
    records = _record(converted, original, batches, leaf_modules)
    modes = {m: m.training for m in converted.modules()}
    fits = []
    try:
        for stage, build in zip(plan.stages, builds, strict=True):
            module = converted.get_submodule(build.module_name)
            data = [
                (
                    r[stage.scope][stage.input],
                    [r[stage.scope][c] for c in build.context],
                    r[stage.scope][stage.output],
                )
                for r in records
            ]
            fits.append(_fit(module, build.module_name, data, steps, lr))
    finally:
        for m, training in modes.items():
            m.train(training)
    seconds = time.perf_counter() - start
    return Calibration(tuple(fits), len(batches), steps, seconds)


Sample = tuple[Tensor, list[Any], Tensor]  # stage input, context, expected output


def _record(
    converted: nn.Module,
    original: nn.Module,
    batches: list[Any],
    leaf_modules: Iterable[LeafSpec],
) -> list[dict[str, dict[str, Any]]]:
    """Each batch's stage inputs, contexts and outputs, per scope, from the original
    in eval mode.

    The original is analysed again (a copy, as convert did), which gives the graphs
    whose node names the plan records; the stages must match the converted ones.
    """
    plan = converted.revcompile_plan
    options = Options.make(min_blocks=plan.min_blocks, leaf_modules=leaf_modules)
    again = analyze_model(original, batches[0], options)

    def spans(p: Plan) -> list[tuple]:
        return [(s.scope, s.input, s.output, s.blocks) for s in p.stages]

    if spans(again.plan) != spans(plan):
        raise ConversionError(
            f"{type(original).__name__} does not trace into the graphs that were "
            "converted (its stages differ); pass the original model, with the "
            "leaf_modules given to convert()."
        )
    wanted: dict[str, set[str]] = {}
    for stage, build in zip(plan.stages, converted.revcompile_builds, strict=True):
        wanted.setdefault(stage.scope, set()).update(
            (stage.input, stage.output, *build.context)
        )
    # The class's method: torch.export's graphs replace train()/eval() with ones
    # that raise, on the instance only.
    nn.Module.train(again.model, False)
    records = []
    for batch in batches:
        args, kwargs = normalise(batch, original)
        calls = record_calls(again.model, args, kwargs)
        record = {}
        for scope in again.search.scopes:
            gm = scope.traced.gm
            nn.Module.train(gm, False)
            values = scope.traced.pattern.tensors(calls[scope.path].arguments)
            record[scope.path] = capture(gm, values, wanted.get(scope.path, ()))
        records.append(record)
    return records


def _fit(
    stage: nn.Module, name: str, data: list[Sample], steps: int, lr: float
) -> StageFit:
    before = _error(stage, data)
    # Put back if the fit makes things worse: the original's running statistics may
    # not describe the calibration batches (Note [Calibration]).
    saved = {k: v.clone() for k, v in stage.state_dict().items()}
    params = [p for p in stage.parameters() if p.requires_grad]
    if steps and params:
        # foreach: one kernel per step for all tensors, not a Python loop over them
        # (the default off CUDA); a stage has many small ones.
        optimizer = torch.optim.Adam(params, lr=lr, foreach=True)
        _batch_norm_mode(stage)
        # Plain autograd: a stage on a few batches fits in memory, and the reversible
        # backward would only add the recompute.
        with storing_activations():
            for step in range(steps):
                x, context, y = data[step % len(data)]
                loss = _relative(stage(x, *context), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    _recompute_statistics(stage, data)
    after = _error(stage, data)
    if after > before:
        stage.load_state_dict(saved)
        return StageFit(name, before, before, undone=True)
    return StageFit(name, before, after)


def _batch_norm_mode(stage: nn.Module) -> None:
    """Eval mode but for batch norms (Note [Calibration])."""
    stage.eval()
    for m in stage.modules():
        if isinstance(m, _BatchNorm):
            m.train()


def _recompute_statistics(stage: nn.Module, data: list[Sample]) -> None:
    """Running statistics of every batch norm as the plain average over `data`."""
    norms = [m for m in stage.modules() if isinstance(m, _BatchNorm)]
    norms = [m for m in norms if m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    _batch_norm_mode(stage)
    with torch.no_grad():
        for x, context, _ in data:
            stage(x, *context)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def _error(stage: nn.Module, data: list[Sample]) -> float:
    stage.eval()
    with torch.no_grad():
        errors = [_relative(stage(x, *c), y).item() for x, c, y in data]
    return sum(errors) / len(errors)


def _relative(out: Tensor, target: Tensor) -> Tensor:
    out, target = out.float(), target.float()
    return (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
