"""The analysis pipeline: record calls, find the scopes, trace and plan them, merge.

`analyze_model` returns the `Search` (each scope's trace and plan, whose node names
the rewrite edits) together with the model's `Plan`, which merges the scopes' plans
into one record with module paths in the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from revcompile.errors import TraceError
from revcompile.passes import inputs as _inputs
from revcompile.passes.budget import plan_budget
from revcompile.passes.calls import record_calls
from revcompile.passes.flat import input_names
from revcompile.passes.ir import Plan, Reason, ReasonKind, ResidualBlock, Scope, Stage
from revcompile.passes.options import Options
from revcompile.passes.scopes import Search, search
from revcompile.passes.trace import _copy, disable_caches, leaf_spec
from revcompile.runtime.calls import tensor_leaves
from revcompile.runtime.scope import bind_call


@dataclasses.dataclass(frozen=True)
class Analysis:
    """A model ready to rewrite: the copy that was traced, the search, the plan."""

    model: nn.Module
    search: Search
    plan: Plan
    inputs: _inputs.Inputs  # the example, as the model was called on it


def analyze_model(
    model: nn.Module, example_inputs: Any, options: Options, *, copy_model: bool = True
) -> Analysis:
    """Trace the scopes of a copy of ``model`` (Note [Smallest enclosing submodule])
    and plan them. ``copy_model=False`` works on ``model`` itself, for callers that
    own a throwaway model (the CLI, `convert`, which copies first)."""
    args, kwargs = _inputs.normalise(example_inputs, model)
    (args, kwargs), widened = _inputs.widen_batch(args, kwargs)
    root = _copy(model) if copy_model else model
    notes = [n for n in (widened, *disable_caches(root)) if n]
    try:
        arguments = bind_call(root, args, kwargs)
        calls = record_calls(root, args, kwargs)
    except Exception as e:  # the model's own forward refused the example
        raise TraceError(
            f"{type(model).__name__} does not run on the example inputs "
            f"{_inputs.shapes(args, kwargs) or '(none)'}: {type(e).__name__}: {e}. "
            f"Pass example_inputs= that the model accepts (a tuple of tensors, or a "
            f"dict of keyword tensors)."
        ) from e
    found = search(root, calls, options, leaf_spec(model, options.leaf_modules))
    if not found.scopes and not found.seen and "" in found.failures:
        raise found.failures[""]
    order = {path: i for i, path in enumerate(calls)}
    found.scopes.sort(key=lambda s: order.get(s.path, 0))
    budgeted = plan_budget(found, root, (args, kwargs), options)
    found.scopes[:] = budgeted.scopes
    notes.extend(budgeted.notes)
    plan = _merge(root, arguments, found, options, notes, order)
    plan = dataclasses.replace(
        plan,
        budget=budgeted.budget,
        original_bytes=budgeted.original,
        predicted_bytes=budgeted.predicted,
    )
    return Analysis(root, found, plan, (args, kwargs))


def _merge(
    root: nn.Module,
    arguments: dict[str, Any],
    found: Search,
    options: Options,
    notes: list[str],
    order: dict[str, int],
) -> Plan:
    blocks: list[ResidualBlock] = []
    stages: list[Stage] = []
    scopes = []
    for scope in found.scopes:
        offset = len(stages)
        stages.extend(
            dataclasses.replace(s, index=offset + s.index, scope=scope.path)
            for s in scope.plan.stages
        )
        blocks.extend(
            dataclasses.replace(
                b, scope=scope.path, stage=None if b.stage is None else offset + b.stage
            )
            for b in scope.plan.blocks
        )
        scopes.append(
            Scope(
                scope.path,
                type(scope.module).__name__,
                scope.traced.tracer,
                len(scope.plan.stages),
            )
        )
        notes.extend(_scoped(scope.path, n) for n in scope.traced.notes)
    blocks.extend(found.seen)
    blocks.sort(key=lambda b: _position(b.module_path, order))
    for path, error in found.failures.items():
        # Why the search went below a module; other failures are of layers that hold
        # no stage.
        if not path or any(s.path.startswith(path + ".") for s in found.scopes):
            first = str(error).split(": ", 1)[-1][:300]
            notes.append(f"{path or 'the model'} was not traced: {first}")
    tracers = sorted({s.tracer for s in scopes}) or (
        [found.root.tracer] if found.root else []
    )
    total = (
        found.root.activation_bytes
        if found.root
        else sum(s.plan.activation_bytes for s in found.scopes)
    )
    root_notes = found.root.notes if found.root and not found.scopes else ()
    return Plan(
        tracer="+".join(tracers) or "none",
        training=root.training,
        inputs=_input_shapes(arguments),
        blocks=tuple(blocks),
        stages=tuple(stages),
        activation_bytes=total,
        min_blocks=options.min_blocks,
        notes=tuple(dict.fromkeys((*notes, *root_notes))),
        scopes=tuple(scopes),
    )


def _scoped(path: str, note: str) -> str:
    return f"{path}: {note}" if path else note


def _position(path: str, order: dict[str, int]) -> int:
    """Where the block's module was first called: blocks in model order."""
    while path not in order and path:
        path = path.rpartition(".")[0]
    return order.get(path, 0)


def _input_shapes(arguments: dict[str, Any]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    tensors = tensor_leaves(arguments)
    names = input_names(arguments)
    return tuple((n, tuple(t.shape)) for n, t in zip(names, tensors, strict=True))


def drop_stages(plan: Plan, failed: dict[int, str]) -> tuple[Plan, dict[int, int]]:
    """`plan` without the stages whose rewrite failed (index -> why): their blocks
    get a REWRITE_FAILED reason; returns the new plan and old -> new stage indices."""
    if not failed:
        return plan, {s.index: s.index for s in plan.stages}
    kept = [s for s in plan.stages if s.index not in failed]
    index = {s.index: i for i, s in enumerate(kept)}
    stages = tuple(dataclasses.replace(s, index=index[s.index]) for s in kept)
    blocks = []
    for b in plan.blocks:
        if b.stage in failed:
            why = f"the rewrite of its stage failed ({failed[b.stage]}); it stays as is"
            b = dataclasses.replace(
                b, reason=Reason(ReasonKind.REWRITE_FAILED, why), stage=None
            )
        elif b.stage is not None:
            b = dataclasses.replace(b, stage=index[b.stage])
        blocks.append(b)
    scopes = tuple(
        dataclasses.replace(c, stages=sum(s.scope == c.path for s in stages))
        for c in plan.scopes
    )
    new = dataclasses.replace(plan, blocks=tuple(blocks), stages=stages, scopes=scopes)
    return new, index
