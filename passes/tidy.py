"""Remove what a rewrite leaves behind: dead nodes, and parameters nothing reads.

Note [Checks keep dead code alive]
fx's `eliminate_dead_code` keeps impure nodes, and torch.export graphs check tensor
metadata with impure asserts (``aten._assert_tensor_metadata`` after every ``.to()``,
as in Llama's RMSNorm). Once a stage replaces a block, such a check on the block's old
values is the only reader of a whole dead chain, which would still run (the
original attention and MLP, computed and thrown away) and keep the original weights
as parameters that never get a gradient (DDP then fails on the second step). A check
is kept only while every value it checks is live; random ops (dropout, attention with
dropout), which fx also keeps, go when nothing reads them.
"""

from __future__ import annotations

import torch
from torch import fx

from revcompile.passes.dataflow import alias_root
from revcompile.passes.ops import mutated_input, name

_CHECKS = {"_assert", "_assert_tensor_metadata", "_assert_scalar", "_assert_async"}
_CHECKS |= {"sym_constrain_range", "sym_constrain_range_for_size"}


def _is_check(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target is torch._assert or name(node) in _CHECKS
    )


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """`eliminate_dead_code`, also erasing checks of dead values (Note [Checks keep
    dead code alive])."""
    graph = gm.graph
    roots = [n for n in graph.nodes if n.op == "output"]
    roots += [n for n in graph.nodes if _impure(n) and not _is_check(n)]
    # A write fx takes for pure (``out.narrow(...).copy_(y)`` as a method call, whose
    # result nobody reads) is live while the storage it writes is.
    writes = {
        n: alias_root(w, gm)
        for n in graph.nodes
        if not _impure(n) and (w := mutated_input(n, gm)) is not None
    }
    live: set[fx.Node] = set()
    kept: set[fx.Node] = set()
    while roots:
        while roots:
            node = roots.pop()
            if node not in live:
                live.add(node)
                roots.extend(node.all_input_nodes)
        roots = [n for n, root in writes.items() if n not in live and root in live]
        kept.update(roots)
    for node in reversed(list(graph.nodes)):
        if _is_check(node) and not set(node.all_input_nodes) <= live:
            graph.erase_node(node)
    graph.eliminate_dead_code(is_impure_node=lambda n: n in kept or _impure(n))


def _impure(node: fx.Node) -> bool:
    # Random ops count as pure: a dead dropout or attention would only draw numbers
    # nothing reads (fx keeps them by default).
    return node.is_impure(impure_random=False)


def drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete parameters and buffers that no node reads any more (the originals of
    sliced or replaced layers): they would never get a gradient, which DDP rejects."""
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(f"{n.target}." for n in gm.graph.nodes if n.op == "call_module")
    tensors = [*gm.named_parameters(), *gm.named_buffers()]
    for full, _ in tensors:
        if full in read or full.startswith(called):
            continue
        owner, _, attr = full.rpartition(".")
        delattr(gm.get_submodule(owner), attr)
