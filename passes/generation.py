"""Trace the other calls a scope gets: from ``generate``, and from a padding mask
unlike the example's.

See Note [Graphs that share one stage] in variants.py: this runs before the first
rewrite, on the submodules as the user wrote them. A decoder layer receives a
4-d mask when some sequence is padded and None when none is (transformers then
lets attention be causal by itself): an example with padding, or a batch of one
without, sees only one of the two, so the model is also run on the example with
the other mask, and a scope called differently gets that call's graph too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import nn

from revcompile.errors import TraceError
from revcompile.passes.calls import ModuleCall, record_calls, record_generation_calls
from revcompile.passes.ir import Plan, Policy
from revcompile.passes.options import Options
from revcompile.passes.pipeline import Analysis
from revcompile.passes.scopes import plan_traced
from revcompile.passes.trace import Traced, leaf_spec, trace_call
from revcompile.runtime.calls import CallPattern


class OtherCall(NamedTuple):
    """Another call of a scope: its trace and plan, or why it has none (a refusal
    the converted scope names when it gets such a call)."""

    pattern: CallPattern
    built: tuple[Traced, Plan] | str


@dataclass(frozen=True)
class GenerationTraces:
    traces: dict[str, list[OtherCall]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # for the plan; each OtherCall's go in with it


def generate_traces(
    analysis: Analysis, options: Options, model: nn.Module
) -> GenerationTraces:
    """Per rewritten scope, a trace and plan of each call unlike the example's
    (or why there is none): ``generate``'s (with and without padding, prompt and
    decoding step) and a forward's with the other form of padding mask."""
    args, kwargs = analysis.inputs
    scopes = [s for s in analysis.search.scopes if _rewritten(s.plan)]
    if not scopes:
        return GenerationTraces()
    leaves = leaf_spec(model, options.leaf_modules)
    traces: dict[str, list[OtherCall]] = {}
    recorded = [
        *(
            record_generation_calls(analysis.model, args, kwargs, p)
            for p in (True, False)
        ),
        *(_forward_calls(analysis.model, args, kwargs, p) for p in (True, False)),
    ]
    for calls in recorded:
        for scope in scopes:
            call = calls.get(scope.path)
            for arguments in () if call is None else (call.arguments, *call.others):
                mine = traces.setdefault(scope.path, [])
                known = [scope.traced.pattern, *(o.pattern for o in mine)]
                if any(p.mismatch(arguments) is None for p in known):
                    continue
                pattern = CallPattern.of(arguments)
                try:
                    traced = trace_call(
                        scope.module,
                        arguments,
                        leaves=leaves,
                        tracer=options.tracer,
                        path=scope.path,
                    )
                except TraceError as e:
                    mine.append(OtherCall(pattern, f"it does not trace: {e}"))
                    continue
                pattern = traced.pattern  # with the sizes it takes to be equal
                plan = _policies_of(scope.plan, plan_traced(traced, options))
                if plan is None:
                    why = "its graph has other residual blocks than the example's"
                    mine.append(OtherCall(pattern, why))
                    continue
                mine.append(OtherCall(pattern, (traced, plan)))
    return GenerationTraces(traces)


def _policies_of(main: Plan, plan: Plan) -> Plan | None:
    """`plan` with the main call's per-block policies (the planner chose them on
    the example: checkpointed kept blocks), where the two calls have alike blocks."""
    if len(plan.blocks) != len(main.blocks) or len(plan.stages) != len(main.stages):
        return None
    blocks = tuple(
        b if b.stage is not None else replace(b, policy=m.policy)
        for b, m in zip(plan.blocks, main.blocks, strict=True)
    )
    return replace(plan, blocks=blocks)


def _rewritten(plan: Plan) -> bool:
    """Whether the rewrite changes the scope: a stage or a checkpointed block."""
    return bool(plan.stages) or any(b.policy is Policy.CHECKPOINT for b in plan.blocks)


def _forward_calls(
    model: nn.Module, args: tuple, kwargs: dict, padded: bool
) -> dict[str, ModuleCall]:
    """The calls of a run on the example with its padding mask replaced: the first
    position of the first sequence masked (`padded`), or nothing masked."""
    mask = kwargs.get("attention_mask")
    if (
        not isinstance(mask, torch.Tensor)
        or mask.dim() != 2
        or mask.is_floating_point()
    ):
        return {}
    mask = torch.ones_like(mask)
    if padded:
        mask[0, 0] = 0
    try:
        return record_calls(model, args, {**kwargs, "attention_mask": mask})
    except Exception:
        return {}
