"""Cut a block's branch out of a traced graph, as its own GraphModule.

Every stage is built from its blocks' branches: ``(stream, *context) -> branch
output``, with the post-join glue of the block before moved in front (Note [Glue
inside a stage] in rewrite.py). The context a stage passes to its branches is the
plan's plus the outside scalars (symbolic sizes) the branches turn out to read.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from revcompile.passes.ir import GlueKind, ResidualBlock, Stage


def stream_source(stage: Stage, i: int) -> str:
    """The node whose value enters coupling `i`: the stage input, or the previous
    block's join (the glue after it moves into this block's branch)."""
    return stage.input if i == 0 else stage.blocks[i - 1]


def stage_context(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    stage: Stage,
    blocks: dict[str, ResidualBlock],
) -> list[str]:
    """The plan's context plus the outside scalars the branches turn out to read."""
    names = list(stage.context)
    for i, join in enumerate(stage.blocks):
        block = blocks[join]
        glue = prelude(nodes[stream_source(stage, i)], nodes[block.fork], stage)
        while True:
            try:
                extract_branch(gm, nodes, block, glue, names)
                break
            except NeedsInput as need:
                names.append(need.node.name)
    return names


def prelude(source: fx.Node, fork: fx.Node, stage: Stage) -> list[fx.Node]:
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


class NeedsInput(Exception):
    """The branch reads a non-tensor value from outside (a symbolic size of a model
    input, say): the stage passes it in as context."""

    def __init__(self, node: fx.Node) -> None:
        super().__init__(node.name)
        self.node = node


def extract_branch(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    block: ResidualBlock,
    prelude: list[fx.Node],
    context: list[str],
) -> fx.GraphModule:
    """``(stream, *context) -> branch output`` as its own GraphModule over `gm`'s
    modules and parameters (the split copies what it changes).

    Shape reads and other values computed from the branch are copied along with it;
    a non-tensor value from outside raises `NeedsInput` so the caller can add it to
    the stage's context.
    """
    source = prelude[0].all_input_nodes[0] if prelude else nodes[block.fork]
    return extract(
        gm, nodes, source, [*prelude, *(nodes[n] for n in block.branch)], context,
        block.module_path,
    )  # fmt: skip


def extract_span(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    block: ResidualBlock,
    context: list[str],
    after: tuple[str, ...] = (),
) -> fx.GraphModule:
    """``(fork, *context) -> join``, or the last of `after` (glue it takes in): the
    whole block, shortcut and all, for a checkpoint."""
    order = {name: i for i, name in enumerate(nodes)}
    body = (*block.branch, *block.skip, block.join, *after)
    names = sorted(body, key=order.__getitem__)
    span = [nodes[n] for n in names]
    return extract(gm, nodes, nodes[block.fork], span, context, block.module_path)


def span_context(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    block: ResidualBlock,
    after: tuple[str, ...] = (),
) -> list[str]:
    """The block's context plus the outside scalars its span turns out to read."""
    names = list(block.context)
    while True:
        try:
            extract_span(gm, nodes, block, names, after)
            return names
        except NeedsInput as need:
            names.append(need.node.name)


def extract(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    source: fx.Node,
    body: list[fx.Node],
    context: list[str],
    where: str,
) -> fx.GraphModule:
    """``(source, *context) -> the last of body``, copying what `body` reads."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {source: graph.placeholder("stream")}
    for name in context:
        env[nodes[name]] = graph.placeholder(f"ctx_{name}")

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op == "placeholder":
                raise ValueError(f"branch of {where} reads input {n.name}")
            if _is_scalar(n) and _reads_outside(n, env):
                raise NeedsInput(n)
            env[n] = graph.node_copy(n, lookup)
        return env[n]

    for node in body:
        lookup(node)
    graph.output(env[body[-1]])
    _clone_written_inputs(graph)
    return fx.GraphModule(gm, graph)


def _clone_written_inputs(graph: fx.Graph) -> None:
    """An input the branch writes in place (a MoE router's ``full_like`` buffer,
    scattered into, becomes context) is cloned first: F and G run again in
    backward on the same context, and autograd refuses writes into the leaves that
    stand for it there."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    first = next((n for n in graph.nodes if n.op != "placeholder"), None)
    for node in inputs:
        if first is None or not any(_writes(u, node) for u in node.users):
            continue
        with graph.inserting_before(first):
            clone = graph.call_method("clone", (node,))
        node.replace_all_uses_with(clone, delete_user_cb=lambda u, c=clone: u is not c)


def _writes(node: fx.Node, value: fx.Node) -> bool:
    """Whether `node` writes `value` in place (its first argument)."""
    if not node.args or node.args[0] is not value:
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        alias = (
            target._schema.arguments[0].alias_info if target._schema.arguments else None
        )
        return bool(alias is not None and alias.is_write)
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


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
