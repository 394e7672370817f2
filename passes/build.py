"""Build one planned stage as a `ReversibleStage` of the chosen coupling family.

Splitting families (additive, hamiltonian, scaled) get F and G sliced from each
block's branch (Note [Slice, don't pad] in restrict.py). Full-width families get each
block's own branch, copied with its weights: twin pairs consecutive blocks, midpoint
and leapfrog start with an Euler step, momentum adds its velocity. ``fixed_point``
keeps every block exactly: its branch has no glue moved in front, and a post-join
LayerNorm becomes the coupling's norm, inverted from the statistics it saves.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from revcompile.passes.channel_split import split_branch
from revcompile.passes.extract import extract_branch, prelude, stream_source
from revcompile.passes.ir import GlueKind, ResidualBlock, Stage
from revcompile.passes.norms import layer_norm_module
from revcompile.passes.options import Options
from revcompile.runtime.couplings import FAMILIES
from revcompile.runtime.stage import ReversibleStage


@dataclass(frozen=True)
class StageBuild:
    """What the rewrite built for one stage, for the plan's readers."""

    stage: int
    module_name: str
    context: tuple[str, ...]  # node names passed to the stage after its input
    halves: tuple[tuple[str, str], ...]  # (F method, G method) per block
    details: tuple[str, ...]
    coupling: str = "additive"


def build_stage(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    stage: Stage,
    blocks: dict[str, ResidualBlock],
    context_names: list[str],
    values: dict[str, Any],
    options: Options,
    name: str,
) -> tuple[ReversibleStage, StageBuild]:
    family = FAMILIES[options.coupling]
    context = [values[c] for c in context_names]
    units: list[Any] = []
    halves, details = [], []
    for i, join in enumerate(stage.blocks):
        block = blocks[join]
        if family.name == "fixed_point":
            branch = extract_branch(gm, nodes, block, [], context_names)
            norm = norm_after(gm, nodes, stage, blocks, i)
            f = full_width(branch, options)
            units.append(f if norm is None else (f, norm))
            halves.append(("full", "full"))
            details.append(f"{block.module_path}: f kept" + (" + norm" if norm else ""))
            continue
        source = stream_source(stage, i)
        glue = prelude(nodes[source], nodes[block.fork], stage)
        branch = extract_branch(gm, nodes, block, glue, context_names)
        if not family.splits:
            units.append(full_width(branch, options))
            halves.append(("full", "full"))
            details.append(f"{block.module_path}: f at full width")
            continue
        f, g = split_branch(
            branch,
            (values[source], *context),
            dim=stage.channel_dim,
            sizes=stage.split,
            hidden=options.hidden,
        )
        units.append((_outplace(f.module), _outplace(g.module)))
        halves.append((f.method, g.method))
        details.append(f"{block.module_path}: F {f.method} ({f.detail}); G {g.method}")
    couplings = family.build(units, **dict(options.coupling_options))
    sizes = stage.split if family.splits else None
    module = ReversibleStage(
        couplings, dim=stage.channel_dim, split_sizes=sizes, guard=options.guard
    )
    build = StageBuild(
        stage.index,
        name,
        tuple(context_names),
        tuple(halves),
        tuple(details),
        family.name,
    )
    return module, build


def full_width(branch: fx.GraphModule, options: Options) -> nn.Module:
    """A block's own branch, with its own copy of the weights; with ``init="fixup"``
    its last layer starts at zero (Fixup's key step, as in RevUp), so the block
    starts as the identity and its fixed-point inverse converges at once."""
    f = _outplace(copy.deepcopy(branch))
    if options.init == "fixup":
        zero_last_layer(f)
    return f


def zero_last_layer(f: fx.GraphModule) -> bool:
    """Zero the weight (and bias) of the last layer with a weight in `f`'s graph."""
    for node in reversed(list(f.graph.nodes)):
        owner = None
        if node.op == "call_module":
            owner = f.get_submodule(str(node.target))
        elif node.op == "call_function" and node.args:
            weights = [a for a in node.args[1:3] if isinstance(a, fx.Node)]
            attrs = [a for a in weights if a.op == "get_attr"]
            if attrs:
                for a in attrs:
                    _zero(_attr(f, str(a.target)))
                return True
        if owner is not None and getattr(owner, "weight", None) is not None:
            _zero(owner.weight)
            if getattr(owner, "bias", None) is not None:
                _zero(owner.bias)
            return True
    return False


def norm_after(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    stage: Stage,
    blocks: dict[str, ResidualBlock],
    i: int,
) -> nn.LayerNorm | None:
    """The post-join LayerNorm between block `i` and the next one of the stage, as a
    module sharing the graph's weights; None where there is none (identity glue)."""
    if i + 1 >= len(stage.blocks):
        return None
    kinds = {g.node: g.kind for g in stage.glue}
    fork = nodes[blocks[stage.blocks[i + 1]].fork]
    chain = prelude(nodes[stage.blocks[i]], fork, stage)
    norms = [n for n in chain if kinds[n.name] is GlueKind.NORM]
    if not norms:
        return None
    norm = layer_norm_module(norms[0], gm) if len(norms) == 1 else None
    if norm is None:
        raise ValueError(
            f"the glue after {stage.blocks[i]} is not one LayerNorm: fixed_point "
            "cannot invert it"
        )
    return norm


def _outplace(m: nn.Module) -> nn.Module:
    """F and G must never write into their input, which is a view of the stage's."""
    for sub in m.modules():
        if getattr(sub, "inplace", False) is True:
            sub.inplace = False
    return m


def _attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _zero(t: Any) -> None:
    if t is not None:
        t.data.zero_()
