"""Which blocks a fixed-point stage can invert: measured on real activations.

Note [Convert only what converges]
``coupling="fixed_point"`` keeps each block ``x + f(x)`` exactly and rebuilds x in
backward by iterating ``x <- y - f(x)``. That converges only where f is contractive
near x, which no shape or op tells; so every eligible block is tried on the value it
really receives for the example (``probe_fixed_point``: the backward's own solver,
its tolerance and iteration cap). A block that does not converge keeps a Reason with
the measured rate and stays as it is, and the chains are formed again around it. A
block that converges here and stops converging in training falls back on the stage's
drift guard (on by default for this family), never on a wrong gradient.
"""

from __future__ import annotations

from typing import Any

from revcompile.passes.build import full_width, norm_after
from revcompile.passes.capture import capture
from revcompile.passes.extract import extract_branch, stage_context
from revcompile.passes.ir import Plan, Reason, ReasonKind
from revcompile.passes.options import Options
from revcompile.passes.trace import Traced
from revcompile.runtime.couplings import probe_fixed_point


def probe_blocks(
    traced: Traced, plan: Plan, options: Options
) -> tuple[dict[str, Reason], list[str]]:
    """Reasons for the blocks of `plan`'s stages whose inverse does not converge
    (by join), and one note per stage with the iteration counts."""
    gm = traced.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    blocks = {b.join: b for b in plan.blocks}
    solver = {
        k: v for k, v in options.coupling_options if k in ("tol", "max_iter", "memory")
    }
    contexts, wanted = {}, set()
    for stage in plan.stages:
        contexts[stage.index] = stage_context(gm, nodes, stage, blocks)
        wanted.update(contexts[stage.index])
        wanted.update(blocks[j].fork for j in stage.blocks)
    values = capture(gm, traced.values, wanted)
    rejected: dict[str, Reason] = {}
    notes = []
    for stage in plan.stages:
        names = contexts[stage.index]
        context: list[Any] = [values[c] for c in names]
        iterations = []
        for i, join in enumerate(stage.blocks):
            block = blocks[join]
            f = full_width(extract_branch(gm, nodes, block, [], names), options)
            norm = norm_after(gm, nodes, stage, blocks, i)
            probe = probe_fixed_point(
                f, values[block.fork], *context, norm=norm, **solver
            )
            if probe.converged:
                iterations.append(probe.iterations)
                continue
            where = block.module_path or "(top level)"
            rejected[join] = Reason(
                ReasonKind.NOT_CONTRACTIVE,
                f"the fixed-point inverse of the block at {where} {probe}; it stays",
            )
        if iterations:
            notes.append(
                f"fixed_point: {len(iterations)} of {len(stage.blocks)} blocks from "
                f"{blocks[stage.blocks[0]].module_path} converge, in "
                f"{min(iterations)}-{max(iterations)} evaluations of f"
            )
    return rejected, notes
