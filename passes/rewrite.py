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
stages under `function_changes`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import Tensor, fx, nn

from revcompile.passes.capture import capture
from revcompile.passes.channel_split import HalfBranch, split_branch
from revcompile.passes.ir import GlueKind, Plan, ResidualBlock, Stage
from revcompile.passes.tidy import drop_unused_attributes, eliminate_dead_code
from revcompile.runtime.coupling import AdditiveCoupling
from revcompile.runtime.stage import ReversibleStage


@dataclass(frozen=True)
class StageBuild:
    """What the rewrite built for one stage, for the plan's readers."""

    stage: int
    module_name: str
    context: tuple[str, ...]  # node names passed to the stage after its input
    halves: tuple[tuple[str, str], ...]  # (F method, G method) per coupling
    details: tuple[str, ...]


@dataclass(frozen=True)
class Rewritten:
    """A rewrite's graph, what it built per stage, and the stages it could not build
    (index -> why: those keep their blocks as they are)."""

    gm: fx.GraphModule
    builds: tuple[StageBuild, ...]
    failed: dict[int, str]


def rewrite(gm: fx.GraphModule, plan: Plan, inputs: list[Any]) -> Rewritten:
    """A new GraphModule in which every stage of `plan` is a `ReversibleStage`.

    `gm` is the traced graph the plan was made from and `inputs` the values of its
    placeholders; neither is modified. A stage whose rewrite raises is left as it was
    and reported in `Rewritten.failed`, so one odd block never stops a conversion.
    """
    gm = _copy_structure(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    blocks = {b.join: b for b in plan.blocks}
    contexts: dict[int, list[str]] = {}
    failed: dict[int, str] = {}
    for stage in plan.stages:
        try:
            contexts[stage.index] = _stage_context(gm, nodes, stage, blocks)
        except Exception as e:  # user code and odd graphs: any error, one stage
            failed[stage.index] = _why(e)
    wanted = set()
    for stage in plan.stages:
        if stage.index in contexts:
            wanted.update(_stream_source(stage, i) for i in range(len(stage.blocks)))
            wanted.update(contexts[stage.index])
    values = capture(gm, inputs, wanted)
    builds = []
    for stage in plan.stages:
        if stage.index in failed:
            continue
        try:
            module, build = _build_stage(
                gm, nodes, stage, blocks, contexts[stage.index], values
            )
        except Exception as e:
            failed[stage.index] = _why(e)
            continue
        _splice(gm, nodes, stage, blocks, build.module_name, module, build.context)
        builds.append(build)
    _outplace_after_stages(gm, {b.module_name for b in builds})
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    drop_unused_attributes(gm)
    gm.recompile()
    return Rewritten(gm, tuple(builds), failed)


def _why(error: BaseException) -> str:
    text = (str(error).splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {text}"


def _copy_structure(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` to edit: its own graph and modules, the same tensors. Parameters
    and buffers stay the ones the traced module owns (and may share with layers
    outside it: tied embeddings)."""
    memo = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    return copy.deepcopy(gm, memo)


def _stream_source(stage: Stage, i: int) -> str:
    """The node whose value enters coupling `i`: the stage input, or the previous
    block's join (the glue after it moves into this block's branch)."""
    return stage.input if i == 0 else stage.blocks[i - 1]


def _build_stage(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    stage: Stage,
    blocks: dict[str, ResidualBlock],
    context_names: list[str],
    values: dict[str, Any],
) -> tuple[ReversibleStage, StageBuild]:
    couplings, halves, details = [], [], []
    context = [values[c] for c in context_names]
    for i, join in enumerate(stage.blocks):
        block = blocks[join]
        source = _stream_source(stage, i)
        prelude = _prelude(nodes[source], nodes[block.fork], stage)
        branch = _extract_branch(gm, nodes, block, prelude, context_names)
        f, g = split_branch(
            branch, (values[source], *context), dim=stage.channel_dim, sizes=stage.split
        )
        couplings.append(AdditiveCoupling(_outplace(f), _outplace(g)))
        halves.append((f.method, g.method))
        details.append(f"{block.module_path}: F {f.method} ({f.detail}); G {g.method}")
    name = _module_name(gm, stage, blocks)
    module = ReversibleStage(couplings, dim=stage.channel_dim, split_sizes=stage.split)
    build = StageBuild(
        stage.index, name, tuple(context_names), tuple(halves), tuple(details)
    )
    return module, build


def _stage_context(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    stage: Stage,
    blocks: dict[str, ResidualBlock],
) -> list[str]:
    """The plan's context plus the outside scalars the branches turn out to read."""
    names = list(stage.context)
    for i, join in enumerate(stage.blocks):
        block = blocks[join]
        prelude = _prelude(nodes[_stream_source(stage, i)], nodes[block.fork], stage)
        while True:
            try:
                _extract_branch(gm, nodes, block, prelude, names)
                break
            except _NeedsInput as need:
                names.append(need.node.name)
    return names


def _prelude(source: fx.Node, fork: fx.Node, stage: Stage) -> list[fx.Node]:
    """Glue nodes from `source` to `fork` (Note [Glue inside a stage]), in order."""
    glue = {g.node: g for g in stage.glue}
    chain: list[fx.Node] = []
    node = fork
    while node is not source:
        if node.name not in glue:
            raise ValueError(
                f"{node.format_node()} lies between two blocks of stage {stage.index} "
                "but is not glue the stage can absorb"
            )
        kind = glue[node.name].kind
        if kind is GlueKind.LAYOUT:
            raise ValueError(f"layout glue {node.name} inside a stage is not supported")
        chain.append(node)
        node = node.all_input_nodes[0]
    return list(reversed(chain))


class _NeedsInput(Exception):
    """The branch reads a non-tensor value from outside (a symbolic size of a model
    input, say): the stage passes it in as context."""

    def __init__(self, node: fx.Node) -> None:
        super().__init__(node.name)
        self.node = node


def _extract_branch(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    block: ResidualBlock,
    prelude: list[fx.Node],
    context: list[str],
) -> fx.GraphModule:
    """``(stream, *context) -> branch output`` as its own GraphModule over `gm`'s
    modules and parameters (the split copies what it changes).

    Shape reads and other values computed from the branch are copied along with it;
    a non-tensor value from outside raises `_NeedsInput` so the caller can add it to
    the stage's context.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    stream = graph.placeholder("stream")
    env[prelude[0].all_input_nodes[0] if prelude else nodes[block.fork]] = stream
    for name in context:
        env[nodes[name]] = graph.placeholder(f"ctx_{name}")

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op == "placeholder":
                raise ValueError(f"branch of {block.module_path} reads input {n.name}")
            if _is_scalar(n) and _reads_outside(n, env):
                raise _NeedsInput(n)
            env[n] = graph.node_copy(n, lookup)
        return env[n]

    for node in prelude:
        env[node] = graph.node_copy(node, lookup)
    for name in block.branch:
        lookup(nodes[name])
    graph.output(env[nodes[block.branch[-1]]])
    return fx.GraphModule(gm, graph)


def _is_scalar(node: fx.Node) -> bool:
    return "tensor_meta" not in node.meta and not isinstance(
        node.meta.get("val"), Tensor
    )


def _reads_outside(node: fx.Node, env: dict[fx.Node, fx.Node]) -> bool:
    """Whether `node` depends on a graph input other than through `env`."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in env or n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        stack.extend(n.all_input_nodes)
    return False


def _outplace(half: HalfBranch) -> nn.Module:
    """F and G must never write into their input, which is a view of the stage's."""
    for m in half.module.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    return half.module


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
    for read in stage.shape_reads:
        node = nodes[read]
        for arg in list(node.all_input_nodes):
            node.replace_input_with(arg, nodes[stage.input])
    _erase_replaced(gm, stage, blocks)


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
