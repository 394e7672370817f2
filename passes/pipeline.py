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
from revcompile.passes.trace import trace


def plan_model(
    model: nn.Module, example_inputs: Any, options: Options, *, copy_model: bool = True
) -> tuple[fx.GraphModule, Plan]:
    """Trace a copy of ``model`` and plan its reversible stages."""
    traced = trace(
        model,
        example_inputs,
        leaf_modules=options.leaf_modules,
        tracer=options.tracer,
        copy_model=copy_model,
    )
    df = dataflow(traced.gm)
    blocks = find_residual_blocks(traced.gm, df)
    return traced.gm, make_plan(traced, blocks, options, df)
