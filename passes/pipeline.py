"""The analysis pipeline: trace, find residual blocks, plan stages.

``plan_model`` returns the traced GraphModule together with the plan, so the rewrite
edits the very graph whose node names the plan records.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from revcompile.passes.analyze import find_residual_blocks
from revcompile.passes.dataflow import dataflow
from revcompile.passes.ir import Plan
from revcompile.passes.options import Options
from revcompile.passes.plan import make_plan
from revcompile.passes.trace import Traced, trace


def plan_model(
    model: nn.Module, example_inputs: Any, options: Options, *, copy_model: bool = True
) -> tuple[fx.GraphModule, Plan]:
    """Trace a copy of ``model`` and plan its reversible stages."""
    traced, plan = trace_and_plan(model, example_inputs, options, copy_model=copy_model)
    return traced.gm, plan


def trace_and_plan(
    model: nn.Module, example_inputs: Any, options: Options, *, copy_model: bool = True
) -> tuple[Traced, Plan]:
    """`plan_model`, keeping the whole trace: the rewrite needs its input values."""
    traced = trace(
        model,
        example_inputs,
        leaf_modules=options.leaf_modules,
        tracer=options.tracer,
        copy_model=copy_model,
    )
    df = dataflow(traced.gm)
    blocks = find_residual_blocks(traced.gm, df)
    return traced, make_plan(traced, blocks, options, df)
