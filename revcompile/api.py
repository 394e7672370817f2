"""The public entry points over the private passes."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from revcompile.errors import ConversionError, InternalError, RevCompileError
from revcompile.passes.fills import find_fills
from revcompile.passes.generation import generate_traces
from revcompile.passes.install import install
from revcompile.passes.ir import Plan
from revcompile.passes.options import LeafSpec, Options
from revcompile.passes.pipeline import analyze_model, drop_stages
from revcompile.passes.rewrite import StageBuild, rewrite
from revcompile.passes.scopes import ScopeTrace
from revcompile.passes.trace import Traced
from revcompile.passes.variants import add_variant, refuse_variant
from revcompile.runtime.calls import CallPattern


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    min_blocks: int = 1,
    leaf_modules: Iterable[LeafSpec] = (),
    tracer: str = "auto",
    coupling: str = "additive",
    coupling_options: Mapping[str, Any] | None = None,
    init: str = "pretrained",
    memory_budget: float | int | None = None,
) -> Plan:
    """Find the residual blocks of ``model`` and plan which convert to reversible stages.

    The model is traced on a deep copy and never modified. Every residual add appears
    once in the plan: in a stage, or with a ``Reason`` saying why it stays as it is.

    Args:
        model: any ``nn.Module``.
        example_inputs: a tuple of positional tensors, or a dict of keyword tensors
            (``{"input_ids": ids, "attention_mask": mask}``). Optional for models whose
            first layer is a Conv (a batch of 2 images of its in_channels, 64x64 or the
            model's ``image_size``), a Linear or an Embedding.
        min_blocks: the fewest blocks a stage may have.
        leaf_modules: module classes, dotted paths or instances that symbolic tracing
            keeps whole; the fix for a submodule fx cannot trace.
        tracer: ``"auto"`` (fx, then torch.export where fx fails), ``"fx"``, ``"export"``.
        coupling, coupling_options, init: as for `convert`; they decide which glue a
            stage absorbs and, for ``"fixed_point"``, which blocks converge.

    Returns:
        The frozen :class:`~revcompile.passes.ir.Plan`; ``plan.to_dict()`` is JSON.

    Raises:
        TraceError: the model could not be traced; the message names the module.
        ConversionError: an option is out of range.

    Example:
        >>> import torchvision, revcompile
        >>> plan = revcompile.analyze(torchvision.models.resnet18())
        >>> print(plan.summary())
        5 of 8 residual blocks in 4 stages convert; about 31% of activation memory no longer stored; 3 blocks kept: projection shortcut (3 checkpointed)
        >>> [len(stage.blocks) for stage in plan.stages]
        [2, 1, 1, 1]
    """  # noqa: E501
    options = Options.make(
        min_blocks=min_blocks,
        leaf_modules=leaf_modules,
        tracer=tracer,
        coupling=coupling,
        coupling_options=coupling_options,
        init=init,
        memory_budget=memory_budget,
    )
    with _unexpected("analyze", model), _fixed_rng():
        return analyze_model(model, example_inputs, options).plan


def convert(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    coupling: str = "additive",
    coupling_options: Mapping[str, Any] | None = None,
    init: str = "pretrained",
    guard: bool | None = None,
    memory_budget: float | int | None = None,
    hidden: str | float = "auto",
    min_blocks: int = 1,
    leaf_modules: Iterable[LeafSpec] = (),
    strict: bool = False,
) -> nn.Module:
    """A copy of `model` in which every planned stage is one `ReversibleStage`.

    The copy is the user's model, of the same class, with its attributes and methods
    (``converted.fc``, ``converted.config``, ``converted.generate``): only the
    smallest submodules that enclose stages are traced and rewritten, and each of
    those keeps its class too (Note [Keep the user's model] in
    revcompile/runtime/scope.py). Everything else is the original computation and
    stores its activations as before (stems, downsampling blocks, heads). Each
    stage's F and G are derived from its blocks' branches and initialised from their
    weights (see Note [Slice, don't pad] in passes/restrict.py), so a pretrained
    model is a warm start for fine-tuning; the coupling is a different function from
    the residual block, so fine-tune before use.

    `model` is never modified. The plan is attached as ``converted.revcompile_plan``
    and what the rewrite did per stage as ``converted.revcompile_builds``.

    Args:
        model: any ``nn.Module``.
        example_inputs: as for `revcompile.analyze`: a tuple of tensors, a dict of
            keyword tensors, or None for vision models.
        coupling: the reversible family, a key of `revcompile.FAMILIES`:
            ``"additive"`` (RevNet: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``, F and
            G sliced from each branch; the default), ``"twin"`` (Reformer's two
            full-width streams), ``"hamiltonian"``, ``"midpoint"``, ``"leapfrog"``
            (Chang et al.), ``"momentum"`` (momentumnet), ``"scaled"`` (MEFT), or
            ``"fixed_point"``: every block kept exactly, inverted by iteration, and
            converted only where that converges on the example.
        coupling_options: the family's options (``FAMILIES[name].options`` lists
            them with their defaults): ``{"h": 1.0}``, ``{"gamma": 0.9}``,
            ``{"l": 0.1, "b": 1.0}``, ``{"tol": ..., "max_iter": 50}``.
        init: ``"pretrained"`` keeps every branch's weights; ``"fixup"`` starts the
            last layer of every branch at zero, for training from scratch (RevUp):
            each block starts as the identity, so fixed-point inverses converge.
        memory_budget: the activation memory the converted model may keep for
            backward: a fraction of the original's (a float in (0, 1]) or bytes at
            the example's size (an int). The planner (Note [Planning under a
            budget]) makes each block reversible, checkpointed or stored, with the
            least recompute that fits; None: every eligible block reversible and
            every kept block checkpointed; 1.0: the original model, unchanged.
        hidden: how the split families' F and G share each branch's hidden width
            (Note [Hidden width] in passes/hidden.py): ``"auto"`` keeps it whole
            where F+G then cost no more than the branch (BasicBlocks, transformer
            layers) and narrows it until they do elsewhere (bottlenecks, inverted
            residuals), so no converted model grows; ``"full"`` keeps every hidden
            unit in both; ``"partition"`` gives each unit to one of them (F+G
            about half the branch); a float in [0.5, 1]: the share each keeps.
        guard: stages also save their input, compare it with the one they rebuild
            and re-anchor on it (Note [Drift guard]); None: the family's default
            (on for fixed_point only).
        min_blocks: the fewest residual blocks a stage may have.
        leaf_modules: modules symbolic tracing keeps whole.
        strict: raise `ConversionError` when nothing converts (otherwise warn).

    Returns:
        The converted copy: an ordinary module for optimizers, ``state_dict``,
        ``torch.save``, ``.to()``, ``train()``/``eval()`` and DDP.

    Example:
        >>> converted = revcompile.convert(torchvision.models.resnet18())
        >>> type(converted).__name__
        'ResNet'
        >>> [len(s.couplings) for s in converted.modules()
        ...  if isinstance(s, revcompile.ReversibleStage)]
        [2, 1, 1, 1]
    """
    options = Options.make(
        min_blocks=min_blocks,
        leaf_modules=leaf_modules,
        coupling=coupling,
        coupling_options=coupling_options,
        init=init,
        guard=guard,
        memory_budget=memory_budget,
        hidden=hidden,
    )
    with _unexpected("convert", model), _fixed_rng():
        return _convert(model, example_inputs, options, strict)


def _convert(
    model: nn.Module, example_inputs: Any, options: Options, strict: bool
) -> nn.Module:
    analysis = analyze_model(model, example_inputs, options)
    plan = analysis.plan
    second = generate_traces(analysis, options, model)
    builds: list[StageBuild] = []
    failed: dict[int, str] = {}
    notes = list(second.notes)
    offset = 0
    for scope in analysis.search.scopes:
        traced = scope.traced
        done = rewrite(traced.gm, scope.plan, traced.values, options)
        if done.changed:  # else the submodule stays eager, as the user wrote it
            arguments = traced.pattern.rebuild(tuple(traced.values))
            fills = find_fills(scope.module, arguments)
            install(scope.module, traced, done.gm, fills)
            for generation in second.traces.get(scope.path, []):
                notes.append(_generation(scope, *generation, options))
        builds.extend(_in_model(b, scope.path, offset) for b in done.builds)
        notes.extend(
            f"{scope.path}: the block at {join} stays stored, its checkpoint failed "
            f"({why})"
            for join, why in done.failed_checkpoints.items()
        )
        failed.update({offset + i: why for i, why in done.failed.items()})
        offset += len(scope.plan.stages)
    plan, index = drop_stages(plan, failed)
    plan = dataclasses.replace(plan, notes=(*plan.notes, *notes))
    if not plan.stages and options.memory_budget is None:
        message = (
            f"{type(model).__name__}: nothing converts ({plan.summary()}). "
            "Run `revcompile report` on the model to see every residual block and why "
            "it stays, or lower `min_blocks`."
        )
        if strict:
            raise ConversionError(message)
        warnings.warn(message, stacklevel=3)
    converted = analysis.model
    converted.train(model.training)
    converted.revcompile_plan = plan
    converted.revcompile_builds = tuple(
        dataclasses.replace(b, stage=index[b.stage]) for b in builds
    )
    return converted


def _generation(
    scope: ScopeTrace,
    pattern: CallPattern,
    built: tuple[Traced, Plan] | str,
    options: Options,
) -> str:
    """Rewrite another call's trace of a scope (generate's, another padding mask's)
    and add it (Note [Graphs that share one stage]); the note says how that went.
    Where it cannot be added, a call of its pattern is refused with the reason."""
    name = scope.path or type(scope.module).__name__
    if isinstance(built, str):
        why = built
    else:
        traced, plan = built
        done = rewrite(traced.gm, plan, traced.values, options)
        why = (
            add_variant(scope.module, traced, done.gm)
            if done.changed
            else "its rewrite converted no stage"
        )
    if why:
        refuse_variant(scope.module, pattern, why)
        return f"{name}: {_OTHER_CALL} will not run: {why}"
    return f"{name}: {_OTHER_CALL} replays a graph of its own, with the same stages"


_OTHER_CALL = "a call unlike the example's (generate's, another padding mask)"


@contextmanager
def _fixed_rng() -> Iterator[None]:
    """Tracing, measuring and probing run the model: under the same seeds every
    time, so that a second convert of a model rebuilds the first (random layer
    drop in train mode decides what a trace or a measurement sees), and with the
    user's random streams left where they were."""
    import random

    state = random.getstate()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch's wheels
        np = None  # type: ignore[assignment]
    np_state = np.random.get_state() if np is not None else None
    cuda = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(0)
        random.seed(0)
        if np is not None:
            np.random.seed(0)
        try:
            yield
        finally:
            random.setstate(state)
            if np is not None:
                np.random.set_state(np_state)


@contextmanager
def _unexpected(what: str, model: nn.Module) -> Iterator[None]:
    """Only RevCompileErrors leave the public entry points: a failure the passes did
    not foresee becomes an InternalError that says what to do."""
    try:
        yield
    except RevCompileError:
        raise
    except Exception as e:
        raise InternalError(
            f"revcompile.{what} failed on {type(model).__name__} with an unexpected "
            f"{type(e).__name__}: {e}. This is a bug in revcompile: please report it "
            f"with the model. Your model is unchanged; `revcompile report` shows "
            f"which blocks convert, and leaf_modules=[...] keeps a troublesome "
            f"module out of the trace."
        ) from e


def _in_model(build: StageBuild, path: str, offset: int) -> StageBuild:
    """A scope's build with the stage's index and module name in the whole model."""
    name = f"{path}.{build.module_name}" if path else build.module_name
    return dataclasses.replace(build, stage=offset + build.stage, module_name=name)
