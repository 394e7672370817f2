"""Trace the calls ``generate`` makes, for the scopes it calls differently.

See Note [Graphs that share one stage] in variants.py: this runs before the first
rewrite, on the submodules as the user wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from revcompile.errors import TraceError
from revcompile.passes.calls import record_generation_calls
from revcompile.passes.ir import Plan
from revcompile.passes.options import Options
from revcompile.passes.pipeline import Analysis
from revcompile.passes.scopes import plan_traced
from revcompile.passes.trace import Traced, leaf_spec, trace_call


@dataclass(frozen=True)
class GenerationTraces:
    traces: dict[str, tuple[Traced, Plan]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def generate_traces(
    analysis: Analysis, options: Options, model: nn.Module
) -> GenerationTraces:
    """Per scope whose ``generate`` call differs from the example's: its trace and
    plan on generate's call."""
    args, kwargs = analysis.inputs
    scopes = [s for s in analysis.search.scopes if s.plan.stages]
    if not scopes:
        return GenerationTraces()
    calls = record_generation_calls(analysis.model, args, kwargs)
    leaves = leaf_spec(model, options.leaf_modules)
    traces, notes = {}, []
    for scope in scopes:
        call = calls.get(scope.path)
        if call is None or scope.traced.pattern.mismatch(call.arguments) is None:
            continue
        try:
            traced = trace_call(
                scope.module,
                call.arguments,
                leaves=leaves,
                tracer=options.tracer,
                path=scope.path,
            )
        except TraceError as e:
            notes.append(f"{scope.path}: generate()'s call does not trace: {e}")
            continue
        traces[scope.path] = (traced, plan_traced(traced, options))
    return GenerationTraces(traces, tuple(notes))
