"""Find every residual add of a traced graph and judge each as a reversible block.

A residual join is an add ``skip + branch`` whose skip operand is, through identity
glue, the *fork*: a value the branch also starts from. Then

- the fork dominates the branch: among activations, every way into the branch passes
  through the fork (the branch reads nothing but the fork and context);
- the join post-dominates the branch: every value the branch computes flows on only
  through the join (nothing inside the branch is read after the block).

An add whose operands both compute from a common value through real ops, one of them a
short chain, is a projection shortcut (ResNet's downsampling blocks). An add with no
parametric op on its branch (GELU's ``x + 0.044715 * x**3``, rotary embeddings) is
arithmetic, not a block. This pass only reads the graph; the verdict of each block is
its first failed check (``checks.py``), or None.

Note [Sums]
``x + attn(ln(x)) + mlp(ln(x))`` (parallel transformer blocks) and RepVGG's
``conv3(x) + conv1(x) + x`` are one residual block whose branch has two paths: the
adds of a sum, each read only by the next, are judged together, and the inner adds are
part of the branch. The branch's value must be a node for the rewrite to take it, so
``(x + attn) + mlp`` is rejected (write ``x + (attn + mlp)``). When the whole sum is no
residual block (``x + f(x) + bias``), each of its adds is judged on its own.
"""

from __future__ import annotations

from torch import fx

from revcompile.passes import checks, ops
from revcompile.passes.dataflow import DataFlow, dataflow
from revcompile.passes.graph import FlowGraph
from revcompile.passes.ir import GlueKind, Reason, ReasonKind, ResidualBlock
from revcompile.passes.memory import stored_bytes
from revcompile.passes.meta import module_path, output_bytes, tensor_info, where


def find_residual_blocks(
    gm: fx.GraphModule, df: DataFlow | None = None
) -> tuple[ResidualBlock, ...]:
    """Every residual add of ``gm`` in graph order, each with its verdict."""
    df = df or dataflow(gm)
    blocks = []
    for node in gm.graph.nodes:
        if node.name not in df.flow.live or not ops.is_add(node):
            continue
        if _inside_sum(node, df):
            continue  # judged with the sum it is part of
        inner: list[fx.Node] = []
        terms = _terms(node, df, inner)
        whole = _match(node, terms, df) if inner else None  # Note [Sums]
        if whole is not None:
            blocks.append(whole)
            continue
        for add in [*inner, node]:
            block = _match(add, list(add.args), df)
            if block is not None:
                blocks.append(block)
    return tuple(blocks)


def _inside_sum(add: fx.Node, df: DataFlow) -> bool:
    users = df.users(add.name)
    return len(users) == 1 and ops.is_add(df.node(users[0]))


def _terms(add: fx.Node, df: DataFlow, inner: list[fx.Node]) -> list[fx.Node]:
    """The operands of a sum of adds, each inner add read only by the next one."""
    terms: list[fx.Node] = []
    for arg in add.args:
        assert isinstance(arg, fx.Node)  # ops.is_add checked
        if ops.is_add(arg) and df.users(arg.name) == [add.name]:
            terms.extend(_terms(arg, df, inner))
            inner.append(arg)
        else:
            terms.append(arg)
    inner.sort(key=lambda n: df.order(n.name))
    return terms


def _match(join: fx.Node, terms: list[fx.Node], df: DataFlow) -> ResidualBlock | None:
    if any(t.name not in df.activations for t in terms):
        return None  # adding a mask, a bias or a position table
    for term in terms:
        fork, skip = _strip_identity(term, df)
        others = [t for t in terms if t is not term]
        if all(fork.name in df.flow.ancestors(t.name) for t in others):
            order = None if term in join.args else checks.sum_order(join, term)
            return _identity_block(join, fork, skip, df, order)
    return _projection_block(join, *terms, df) if len(terms) == 2 else None


def _strip_identity(node: fx.Node, df: DataFlow) -> tuple[fx.Node, tuple[str, ...]]:
    """Walk back from a skip operand through identity glue read only by the skip."""
    skip: list[str] = []
    while (
        ops.glue_kind(node, df.gm) is GlueKind.IDENTITY
        and len(df.users(node.name)) == 1
        and isinstance(node.args[0], fx.Node)
    ):
        skip.append(node.name)
        node = node.args[0]
    return node, tuple(reversed(skip))


def _between(df: DataFlow, start: fx.Node, end: fx.Node) -> list[str]:
    """Nodes on paths from ``start`` (excluded) to ``end`` (included), in order."""
    inside = (df.flow.descendants(start.name) & df.flow.ancestors(end.name)) | {
        end.name
    }
    return sorted(inside - {start.name}, key=df.order)


def _parametric(branch: list[str], df: DataFlow) -> bool:
    return any(
        ops.has_parameters(df.node(n), df.gm)
        or any(p in df.param_derived for p in df.flow.preds(n))
        for n in branch
    )


def _identity_block(
    join: fx.Node,
    fork: fx.Node,
    skip: tuple[str, ...],
    df: DataFlow,
    order: Reason | None = None,
) -> ResidualBlock | None:
    """``join = skip(fork) + branch``; the branch's last node is its value (the add's
    other operand) unless ``order`` says the stream was added first."""
    branch = [n for n in _between(df, fork, join) if n not in skip and n != join.name]
    if not _parametric(branch, df):
        return None
    branch = _with_shape_derived(branch, df)
    inside = {*branch, *skip, fork.name}
    context, foreign = _inputs(branch, inside, df)
    reason = (
        order
        or checks.mutation(join, fork, branch, df)
        or checks.shape_change(join, fork)
        or checks.foreign_read(fork, join, foreign, df)
        or checks.escape(join, branch, df)
    )
    return _record(join, fork, skip, branch, context, df, reason)


def _projection_block(
    join: fx.Node, p: fx.Node, q: fx.Node, df: DataFlow
) -> ResidualBlock | None:
    """Both operands compute from a common fork; the shorter side must be a plain chain
    (a downsampling conv, a pool) for this to be a shortcut rather than two branches."""
    top = df.act_tree.parent(join.name)
    if top is None or FlowGraph.is_source(top):
        return None  # the operands share no activation: two unrelated inputs
    fork = df.node(top)
    sides = sorted((_between(df, fork, p), _between(df, fork, q)), key=len)
    shortcut, branch = sides
    if not shortcut:
        return None
    if not _parametric(branch, df) and not _parametric(shortcut, df):
        return None  # arithmetic such as rotary embeddings
    if not _is_chain(shortcut, fork, df) or any(
        ops.is_add(df.node(n)) for n in shortcut
    ):
        return None  # a sum of two branches, not a shortcut
    first = df.node(shortcut[0])
    was, now = tensor_info(fork), tensor_info(join)
    if was and now and was.shape != now.shape:
        why = f" changes the stream {was.shape} -> {now.shape}"
    else:  # e.g. Falcon's `mlp_out += attn_out`: two branches, neither the stream
        why = f"; neither side is {fork.name} itself, so nothing carries the stream"
    reason = Reason(
        ReasonKind.PROJECTION_SHORTCUT,
        f"shortcut through {ops.describe(first, df.gm)} at {where(first)}{why}",
    )
    context, _ = _inputs(branch, {*branch, *shortcut, fork.name}, df)
    return _record(join, fork, tuple(shortcut), branch, context, df, reason)


def _is_chain(nodes: list[str], fork: fx.Node, df: DataFlow) -> bool:
    previous = fork.name
    for n in nodes:
        if [p for p in df.flow.preds(n) if p in df.activations] != [previous]:
            return False
        previous = n
    return True


def _with_shape_derived(branch: list[str], df: DataFlow) -> list[str]:
    """`branch` plus the values it reads that are made from its own values' shapes.

    Note [Shape-derived context]
    A shape read is no data flow (Note [Activations and context]), so
    ``full_like(router_logits, -inf)`` (Llama 4's router) or
    ``zeros_like(chunk_out)`` (a gated delta net's output buffer, then written
    through its views) would count as context: values from outside the branch. But
    what they read is the branch's own value, which the stage replaces; as context,
    the graph around the stage would go on computing the whole branch just for that
    shape, from the original weights (which then get no gradient), and a buffer the
    branch writes through a view would reach the stage as two unrelated inputs. So
    such values (and the views and sizes between) belong to the branch, recomputed
    with it, when nothing outside the branch reads them and none is random (a
    drop-path mask ``new_empty(...).bernoulli_(p)`` stays context, drawn once).
    """
    members = set(branch)
    start = min(df.order(n) for n in branch)
    end = max(df.order(n) for n in branch)
    derived: set[str] = set()
    for node in df.gm.graph.nodes:
        at = df.order(node.name)
        if at <= start or at >= end or node.name in members:
            continue
        if any(a.name in members or a.name in derived for a in node.all_input_nodes):
            derived.add(node.name)
    # What the branch reads of them, through the derived values in between.
    taken: set[str] = set()
    todo = [
        a.name for n in branch for a in df.node(n).all_input_nodes if a.name in derived
    ]
    while todo:
        name = todo.pop()
        if name in taken:
            continue
        taken.add(name)
        todo.extend(a.name for a in df.node(name).all_input_nodes if a.name in derived)
    if not taken:
        return branch
    inside = members | taken
    if any(u.name not in inside for n in taken for u in df.node(n).users):
        return branch  # read outside too: it stays context, as before
    if any(ops.is_stochastic(df.node(n), df.gm) for n in taken):
        return branch  # a random mask (drop path) is context, drawn once
    return sorted(inside, key=df.order)


def _inputs(
    branch: list[str], inside: set[str], df: DataFlow
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Tensors the branch reads from outside: ``(context, (reader, activation) pairs)``.
    Parameters and buffers (``get_attr``) are the branch's own state, not inputs."""
    context: list[str] = []
    foreign: list[tuple[str, str]] = []
    for reader in branch:
        for value in df.flow.preds(reader):
            node = df.node(value)
            if value in inside or node.op == "get_attr" or tensor_info(node) is None:
                continue
            if value in df.activations:
                foreign.append((reader, value))
            elif value not in context:
                context.append(value)
    return tuple(sorted(context, key=df.order)), tuple(foreign)


def _channel_dim(branch: list[str], fork: fx.Node, rank: int, df: DataFlow) -> int:
    """1 when the first op that says anything is a conv or batch norm, else the last,
    counted in the stream's own dims: ``x.permute(0, 2, 3, 1)`` then a layer norm
    (timm's LayerNorm2d) normalises dim 1 of the stream, not its last."""
    perms: dict[str, list[int]] = {fork.name: list(range(rank))}
    for name in branch:
        node = df.node(name)
        data = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        before = perms.get(data.name) if data is not None else None
        first = ops.channel_first(node, df.gm)
        if first is not None:
            local = 1 if first and rank > 2 else rank - 1
            return (
                before[local] if before is not None and len(before) == rank else local
            )
        if before is not None:
            after = _permuted(node, before)
            if after is not None:
                perms[name] = after
    return rank - 1


def _permuted(node: fx.Node, dims: list[int]) -> list[int] | None:
    """Which stream dim each dim of `node` is, for a permute, transpose or an op that
    keeps the layout (contiguous, an activation); None when it is not known."""
    op, args = ops.name(node), node.args[1:]
    flat = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    if op == "permute" and all(isinstance(d, int) for d in flat):
        return [dims[d] for d in flat] if len(flat) == len(dims) else None
    if op in ("transpose", "swapaxes") and len(args) == 2:
        if not all(isinstance(d, int) for d in args):
            return None
        a, b = (int(d) % len(dims) for d in args)
        out = list(dims)
        out[a], out[b] = out[b], out[a]
        return out
    info, source = tensor_info(node), node.args[0]
    if info is not None and isinstance(source, fx.Node):
        before = tensor_info(source)
        if before is not None and before.shape == info.shape and not ops.is_view(node):
            return list(dims)  # elementwise: same layout
    return None


def _record(
    join: fx.Node,
    fork: fx.Node,
    skip: tuple[str, ...],
    branch: list[str],
    context: tuple[str, ...],
    df: DataFlow,
    reason: Reason | None,
) -> ResidualBlock:
    info = tensor_info(fork)
    shape = info.shape if info else ()
    dim = _channel_dim(branch, fork, len(shape), df) if shape else 0
    channels = shape[dim] if shape else 0
    if reason is None and (len(shape) < 2 or channels < 2):
        reason = Reason(
            ReasonKind.UNSPLITTABLE_OP,
            f"the stream {shape} at {where(join)} has {channels} channel(s) on dim "
            f"{dim}; a coupling needs two halves",
        )
    path = module_path(join) or _common_path(branch, df)
    local = _local_sources(context, path, df)
    stochastic = [n for n in (*branch, *local) if ops.is_stochastic(df.node(n), df.gm)]
    return ResidualBlock(
        join=join.name,
        fork=fork.name,
        skip=skip,
        branch=tuple(branch),
        context=context,
        module_path=path,
        shape=shape,
        dtype=str(info.dtype).removeprefix("torch.") if info else "",
        channel_dim=dim,
        channels=channels,
        stochastic=tuple(stochastic),
        join_in_place=ops.mutated_input(join, df.gm) is not None,
        bytes_stored=stored_bytes([*branch, *skip, join.name], df),
        output_bytes=output_bytes(join),
        reason=reason,
    )


def _local_sources(context: tuple[str, ...], path: str, df: DataFlow) -> list[str]:
    """The context and what computes it inside the block's own module: a drop-path's
    ``new_empty(...).bernoulli_(p)`` mask is context, and random."""
    found: list[str] = []
    todo = [c for c in context if _within(module_path(df.node(c)), path)]
    while todo:
        name = todo.pop()
        if name in found or name in df.activations:
            continue
        found.append(name)
        todo.extend(
            p for p in df.flow.preds(name) if _within(module_path(df.node(p)), path)
        )
    return sorted(found, key=df.order)


def _within(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + ".")


def _common_path(branch: list[str], df: DataFlow) -> str:
    paths = [module_path(df.node(n)).split(".") for n in branch]
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)
