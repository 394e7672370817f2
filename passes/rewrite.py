"""Rewrite each planned stage into one call of a `ReversibleStage`.

The graph keeps everything else as traced: stems, downsampling blocks and heads store
their activations as before. For each stage the pass extracts every block's branch as a
small GraphModule, derives F and G from it (passes/channel_split.py), inserts one
``call_module`` to the new stage and removes the nodes it replaces.

Note [Glue inside a stage]
Between two blocks a stage may absorb glue (Stage.glue). Identity glue vanishes. A
post-join activation or norm cannot act on the stream of a reversible stage (it is not
invertible), so it moves to the start of the next block's branch: ``x + B(relu(x))``
instead of ``relu(x) + B(relu(x))``, the pre-activation form. The plan lists such
stages under `function_changes`. ``coupling="fixed_point"`` keeps every block's
function instead: its stages absorb identity glue and post-join LayerNorms only, and
each norm stays after its block, inverted from the statistics it saves (build.py).

Note [Shapes of replaced values]
Code outside the stage may size something from a value inside a branch: EdgeNeXt builds
its positional encoding from ``x.shape`` of a value its branch computes, as context.
Shape reads are not data flow, so the analysis lets the block convert, but after the
splice such a read would keep the replaced computation alive for its shape alone: a
second copy of the branch in the graph, whose parameters then get no gradient. Each
such read moves to the stage input where the value has the stream's shape (a stride-1
branch keeps it), or to a view of such a value rebuilt outside the stage; a read that
cannot move stays, and the copy with it. Likewise a parameter of a layer that moved
into the stage, still read outside for its ``.device`` or ``.dtype``, is read from a
parameter of the stage instead, so the original leaves the model rather than stay
untrained in it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from revcompile.passes import ops
from revcompile.passes.build import StageBuild, build_stage
from revcompile.passes.capture import capture
from revcompile.passes.extract import (
    extract_span,
    span_context,
    stage_context,
    stream_source,
)
from revcompile.passes.ir import Plan, Policy, ResidualBlock, Stage
from revcompile.passes.options import Options
from revcompile.passes.spans import trailing_glue
from revcompile.passes.tidy import drop_unused_attributes, eliminate_dead_code
from revcompile.runtime.checkpoint import CheckpointedBlock
from revcompile.runtime.scope import resolve
from revcompile.runtime.stage import ReversibleStage


@dataclass(frozen=True)
class Rewritten:
    """A rewrite's graph, what it built per stage, and the stages it could not build
    (index -> why: those keep their blocks as they are)."""

    gm: fx.GraphModule
    builds: tuple[StageBuild, ...]
    failed: dict[int, str]
    failed_checkpoints: dict[str, str]  # join -> why the block stays stored

    @property
    def changed(self) -> bool:
        return bool(self.builds) or any(
            isinstance(m, CheckpointedBlock) for m in self.gm.children()
        )


def rewrite(
    gm: fx.GraphModule, plan: Plan, inputs: list[Any], options: Options | None = None
) -> Rewritten:
    """A new GraphModule in which every stage of `plan` is a `ReversibleStage`.

    `gm` is the traced graph the plan was made from and `inputs` the values of its
    placeholders; neither is modified. A stage whose rewrite raises is left as it was
    and reported in `Rewritten.failed`, so one odd block never stops a conversion.
    """
    options = options or Options()
    gm = _copy_structure(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    blocks = {b.join: b for b in plan.blocks}
    contexts: dict[int, list[str]] = {}
    failed: dict[int, str] = {}
    failed_checkpoints: dict[str, str] = {}
    for stage in plan.stages:
        try:
            contexts[stage.index] = stage_context(gm, nodes, stage, blocks)
        except Exception as e:  # user code and odd graphs: any error, one stage
            failed[stage.index] = _why(e)
    wanted = set()
    for stage in plan.stages:
        if stage.index in contexts:
            wanted.update(stream_source(stage, i) for i in range(len(stage.blocks)))
            wanted.update(blocks[j].fork for j in stage.blocks)
            wanted.update(contexts[stage.index])
    values = capture(gm, inputs, wanted)
    builds = []
    for stage in plan.stages:
        if stage.index in failed:
            continue
        try:
            name = _module_name(gm, stage, blocks)
            module, build = build_stage(
                gm, nodes, stage, blocks, contexts[stage.index], values, options, name
            )
        except Exception as e:
            failed[stage.index] = _why(e)
            continue
        _splice(gm, nodes, stage, blocks, build.module_name, module, build.context)
        builds.append(build)
    for block in plan.blocks:
        if block.policy is Policy.CHECKPOINT and block.stage is None:
            try:
                _checkpoint(gm, nodes, block)
            except Exception as e:  # the block is simply stored then
                failed_checkpoints[block.join] = _why(e)
    _outplace_after_stages(gm, {b.module_name for b in builds})
    eliminate_dead_code(gm)
    _metadata_reads_to_stages(gm, [b.module_name for b in builds])
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    drop_unused_attributes(gm)
    gm.recompile()
    return Rewritten(gm, tuple(builds), failed, failed_checkpoints)


def _why(error: BaseException) -> str:
    text = (str(error).splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {text}"


def _copy_structure(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` to edit: its own graph and modules, the same tensors. Parameters
    and buffers stay the ones the traced module owns (and may share with layers
    outside it: tied embeddings)."""
    memo = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    return copy.deepcopy(gm, memo)


def _module_name(
    gm: fx.GraphModule, stage: Stage, blocks: dict[str, ResidualBlock]
) -> str:
    first = blocks[stage.blocks[0]].module_path or "stage"
    base = "rev_" + first.replace(".", "_")
    name, k = base, 1
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name


def _splice(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    stage: Stage,
    blocks: dict[str, ResidualBlock],
    name: str,
    module: ReversibleStage,
    context: tuple[str, ...],
) -> None:
    """Call the stage right after its output node, take over that node's readers, and
    point shape reads at the stage input (same shape). Dead code elimination then drops
    the nodes the stage replaced."""
    gm.add_submodule(name, module)
    out = nodes[stage.output]
    args = (nodes[stage.input], *(nodes[c] for c in context))
    with gm.graph.inserting_after(out):
        call = gm.graph.call_module(name, args)
    call.meta = {k: v for k, v in out.meta.items() if k != "nn_module_stack"}
    out.replace_all_uses_with(call, delete_user_cb=lambda u: u is not call)
    nodes[out.name] = call  # a later block's fork may be this value
    for read in stage.shape_reads:
        node = nodes[read]
        for arg in list(node.all_input_nodes):
            node.replace_input_with(arg, nodes[stage.input])
    _rebase_branch_shape_reads(gm, stage, blocks, nodes[stage.input])
    _erase_replaced(gm, stage, blocks)


def _rebase_branch_shape_reads(
    gm: fx.GraphModule,
    stage: Stage,
    blocks: dict[str, ResidualBlock],
    source: fx.Node,
) -> None:
    """Point each shape read of a value inside the stage's branches at a value the
    graph still computes (Note [Shapes of replaced values]): else the read keeps the
    replaced computation alive for its shape alone, a second copy whose parameters
    get no gradient."""
    internal = {g.node for g in stage.glue}
    for join in stage.blocks:
        internal.update(blocks[join].branch)
    want = source.meta.get("tensor_meta")
    same: dict[fx.Node, fx.Node | None] = {}

    def outside(node: fx.Node, before: fx.Node) -> fx.Node | None:
        """A node outside the stage with `node`'s shape, or None."""
        if node.name not in internal:
            return node
        if node in same:
            return same[node]
        info = node.meta.get("tensor_meta")
        found: fx.Node | None = None
        if (
            want is not None
            and info is not None
            and hasattr(info, "shape")
            and (tuple(info.shape) == tuple(want.shape) and info.dtype == want.dtype)
        ):
            found = source  # a stride-1 branch keeps the stream's shape
        elif ops.is_view(node) and node.args and isinstance(node.args[0], fx.Node):
            base = outside(node.args[0], before)
            rest = [a for a in node.all_input_nodes if a is not node.args[0]]
            if base is not None and all(a.name not in internal for a in rest):
                with gm.graph.inserting_before(before):  # a view: costs nothing
                    found = gm.graph.node_copy(
                        node, lambda a: base if a is node.args[0] else a
                    )
                found.meta = dict(node.meta)
        same[node] = found
        return found

    for read in list(gm.graph.nodes):
        if not ops.is_shape_read(read) or read.name in internal:
            continue
        for arg in list(read.all_input_nodes):
            if arg.name in internal:
                new = outside(arg, read)
                if new is not None:
                    read.replace_input_with(arg, new)


_METADATA = ("device", "dtype")


def _metadata_reads_to_stages(gm: fx.GraphModule, stage_names: list[str]) -> None:
    """A parameter read only for its ``.device`` or ``.dtype`` (EdgeNeXt's positional
    encoding makes its grid on ``token_projection.weight.device``) whose layer moved
    into a stage reads a parameter of that stage instead: the same device and dtype,
    under every cast, and the original, trained by nothing, leaves the model."""
    other = {
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module"
        or (n.op == "get_attr" and not all(_reads_metadata(u) for u in n.users))
    }
    parts = (t.split(".") for t in other)
    used = {".".join(p[: i + 1]) for p in parts for i in range(len(p))}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or str(node.target) in used or not node.users:
            continue
        if not all(_reads_metadata(u) for u in node.users):
            continue
        value = resolve(gm, str(node.target))
        if not isinstance(value, nn.Parameter):
            continue
        for name in stage_names:
            same = next(
                (
                    f"{name}.{k}"
                    for k, p in gm.get_submodule(name).named_parameters()
                    if p.dtype == value.dtype and p.device == value.device
                ),
                None,
            )
            if same is not None:
                node.target = same
                break


def _reads_metadata(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) > 1
        and node.args[1] in _METADATA
    )


def _erase_replaced(
    gm: fx.GraphModule, stage: Stage, blocks: dict[str, ResidualBlock]
) -> None:
    """Erase the stage's old nodes, even ones DCE keeps as impure (in-place adds)."""
    internal = set(stage.blocks) | {g.node for g in stage.glue}
    for join in stage.blocks:
        internal.update(blocks[join].branch)
    for node in reversed(list(gm.graph.nodes)):
        if node.name in internal and node.op != "get_attr" and not node.users:
            gm.graph.erase_node(node)


def _checkpoint(
    gm: fx.GraphModule, nodes: dict[str, fx.Node], block: ResidualBlock
) -> None:
    """Replace the block's span by one `CheckpointedBlock` call (Note [Checkpoint
    exactly once])."""
    after = tuple(trailing_glue(block, nodes, gm))
    context = span_context(gm, nodes, block, after)
    body = extract_span(gm, nodes, block, context, after)
    base = "ckpt_" + (block.module_path or "block").replace(".", "_")
    name, k = base, 1
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    gm.add_submodule(name, CheckpointedBlock(copy.deepcopy(body)))
    end = nodes[after[-1] if after else block.join]
    with gm.graph.inserting_after(end):
        call = gm.graph.call_module(
            name, (nodes[block.fork], *(nodes[c] for c in context))
        )
    call.meta = {k: v for k, v in end.meta.items() if k != "nn_module_stack"}
    end.replace_all_uses_with(call, delete_user_cb=lambda u: u is not call)
    nodes[end.name] = call  # a later block's fork may be this value
    inside = {*block.branch, *block.skip, block.join, *after}
    for node in reversed(list(gm.graph.nodes)):
        if node.name in inside and node.op != "get_attr" and not node.users:
            gm.graph.erase_node(node)


def _outplace_after_stages(gm: fx.GraphModule, stage_names: set[str]) -> None:
    """An in-place op reading a stage's output would overwrite what the stage saved for
    backward (torchvision's ReLU(inplace=True) after the last block): make it out of
    place, on its own copy of the module."""
    for node in gm.graph.nodes:
        if node.op != "call_module" or str(node.target) not in stage_names:
            continue
        for user in list(node.users):
            if user.op != "call_module":
                continue
            m = gm.get_submodule(str(user.target))
            if getattr(m, "inplace", False) is True:
                fresh = copy.deepcopy(m)
                fresh.inplace = False
                new_name = f"{str(user.target).replace('.', '_')}_outplace"
                gm.add_submodule(new_name, fresh)
                user.target = new_name
