"""Group eligible blocks into stages: maximal chains, each rejection with a reason.

A chain links block A to block B when A's output reaches B's input only through glue
a stage can absorb (identity, shape-preserving layout, a post-join activation or norm),
each value on the way is read by nothing else, and B's input is read only by B. A
stage's input may be read elsewhere (the rewrite never frees it); its intermediate
values may not.

Note [Nested blocks]
A block inside another block's branch (a residual inside a residual) converts as part
of the outer block's F or G, so only the outermost eligible blocks form stages. When
an outer block is dropped (its chain is shorter than ``min_blocks``), the blocks inside
it are considered again, so each add ends in exactly one stage or with one reason.
"""

from __future__ import annotations

import dataclasses

from torch import fx

from revcompile.passes import ops
from revcompile.passes.dataflow import DataFlow, dataflow
from revcompile.passes.ir import (
    Glue,
    GlueKind,
    Plan,
    Reason,
    ReasonKind,
    ResidualBlock,
    Stage,
)
from revcompile.passes.memory import model_bytes, stored_bytes, tensor_bytes
from revcompile.passes.meta import module_path
from revcompile.passes.norms import layer_norm_module
from revcompile.passes.options import Options
from revcompile.passes.trace import Traced

Link = tuple[str, tuple[Glue, ...]]  # (next block's join, glue on the way)


def make_plan(
    traced: Traced,
    blocks: tuple[ResidualBlock, ...],
    options: Options,
    df: DataFlow | None = None,
) -> Plan:
    """Stages from the blocks ``find_residual_blocks`` found in ``traced.gm``."""
    df = df or dataflow(traced.gm)
    by_join = {b.join: b for b in blocks}
    links = {b.join: link for b in blocks if (link := _link(b, blocks, df, options))}
    candidates = [b.join for b in blocks if b.eligible]
    removed: dict[str, Reason] = {}
    while True:  # Note [Nested blocks]
        play = [j for j in candidates if j not in removed]
        nested = _nested(play, by_join)
        chains = _chains([j for j in play if j not in nested], links, df)
        short = [c for c in chains if len(c) < options.min_blocks]
        if not short:
            break
        for chain in short:
            for join in chain:
                removed[join] = Reason(
                    ReasonKind.STAGE_TOO_SHORT,
                    f"the chain at {by_join[chain[0]].module_path or '(top level)'} "
                    f"has {len(chain)} block(s), fewer than min_blocks="
                    f"{options.min_blocks}",
                )
    stages = tuple(
        _stage(i, [by_join[j] for j in chain], links, df, options)
        for i, chain in enumerate(chains)
    )
    stage_of = {j: s.index for s in stages for j in s.blocks}
    verdicts = {**removed, **nested}
    final = tuple(
        dataclasses.replace(b, reason=verdicts[b.join], stage=None)
        if b.join in verdicts
        else dataclasses.replace(b, stage=stage_of.get(b.join))
        for b in blocks
    )
    return Plan(
        tracer=traced.tracer,
        training=traced.training,
        inputs=traced.inputs,
        blocks=final,
        stages=stages,
        activation_bytes=model_bytes(df),
        min_blocks=options.min_blocks,
        notes=traced.notes,
    )


def _link(
    a: ResidualBlock, blocks: tuple[ResidualBlock, ...], df: DataFlow, options: Options
) -> Link | None:
    """Follow A's output through absorbable glue to the block it feeds, if any."""
    value, glue = a.join, []
    while True:
        fed = [b for b in blocks if b.fork == value]
        if fed:
            b = fed[0]
            inside = {*b.branch, *b.skip, b.join}
            if len(fed) > 1 or any(u not in inside for u in df.users(value)):
                return None  # the value is read by two blocks, or by something else
            same = (a.shape, a.dtype, a.channel_dim)
            return (
                (b.join, tuple(glue))
                if same == (b.shape, b.dtype, b.channel_dim)
                else None
            )
        users = df.users(value)
        if len(users) != 1:
            return None
        node = df.node(users[0])
        kind = ops.glue_kind(node, df.gm)
        others = [p for p in df.flow.preds(node.name) if p in df.activations]
        if kind is None or others != [value] or not _absorbs(node, kind, df, options):
            return None
        glue.append(Glue(node.name, kind, ops.describe(node, df.gm), module_path(node)))
        value = node.name


def _absorbs(node: fx.Node, kind: GlueKind, df: DataFlow, options: Options) -> bool:
    """fixed_point keeps the function: only glue it can invert joins two blocks."""
    if not options.keeps_function or kind is GlueKind.IDENTITY:
        return True
    return kind is GlueKind.NORM and layer_norm_module(node, df.gm) is not None


def _nested(play: list[str], by_join: dict[str, ResidualBlock]) -> dict[str, Reason]:
    branches = {j: set(by_join[j].branch) for j in play}
    found = {}
    for inner in play:
        outer = next((j for j in play if j != inner and inner in branches[j]), None)
        if outer is not None:
            o = by_join[outer]
            found[inner] = Reason(
                ReasonKind.NESTED_IN_BRANCH,
                f"inside the branch of the block at {o.module_path or '(top level)'} "
                f"(join {o.join}), which converts as a whole",
            )
    return found


def _chains(tops: list[str], links: dict[str, Link], df: DataFlow) -> list[list[str]]:
    """Maximal paths of ``links`` among ``tops``, in graph order."""
    members = set(tops)
    nxt = {j: links[j][0] for j in tops if j in links and links[j][0] in members}
    has_prev = set(nxt.values())
    chains = []
    for start in sorted(members - has_prev, key=df.order):
        chain = [start]
        while chain[-1] in nxt:
            chain.append(nxt[chain[-1]])
        chains.append(chain)
    return chains


def _stage(
    index: int,
    members: list[ResidualBlock],
    links: dict[str, Link],
    df: DataFlow,
    options: Options,
) -> Stage:
    glue = tuple(g for b in members[:-1] for g in links[b.join][1])
    internal = [b.join for b in members[:-1]] + [g.node for g in glue]
    shape_reads = tuple(
        u.name for v in internal for u in df.node(v).users if ops.is_shape_read(u)
    )
    changes = tuple(
        f"post-join {g.kind.value} {g.op} at {g.module_path or '(top level)'} "
        f"moved into the next block's branch"
        for g in glue
        if g.kind.changes_function and not options.keeps_function
    )
    context = tuple(dict.fromkeys(c for b in members for c in b.context))
    first, last = members[0], members[-1]
    channels = first.channels
    return Stage(
        index=index,
        blocks=tuple(b.join for b in members),
        input=first.fork,
        output=last.join,
        glue=glue,
        channel_dim=first.channel_dim,
        channels=channels,
        split=(channels // 2, channels - channels // 2),
        context=context,
        shape_reads=shape_reads,
        function_changes=changes,
        bytes_before=sum(b.bytes_stored for b in members)
        + stored_bytes([g.node for g in glue], df),
        bytes_after=last.output_bytes,
        context_bytes=tensor_bytes(context, df),
    )
