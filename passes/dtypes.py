"""Make a torch.export graph follow the model's dtype, as the eager model does.

Note [Dtypes that follow the model]
torch.export writes every dtype as a constant: ``h.to(torch.float32)`` (a float32
island: rotary tables, softmax, RMSNorm's variance) and ``h.to(input_dtype)`` (a cast
back to whatever the model computes in) both become ``aten.to.dtype(h, float32)`` when
traced in float32, and so does ``torch.finfo(dtype).min`` in a mask. After
``converted.to(torch.bfloat16)`` the graph would still cast back to float32 (and its
``_assert_tensor_metadata`` checks would refuse the bfloat16 weights). So the module is
exported on a float64 copy, a dtype no model writes by hand: in that graph every
float64 is a dtype that follows the model, and every float32 a real island. This pass
replaces each float64 (and each ``finfo(float64)`` limit) by the dtype of a zero-size
buffer the module carries, `REF`, which ``.to()``/``.half()`` cast with everything
else; the graph then reads the module's own float32 weights again (passes/flat.py).
Under a cast the converted model computes what the original computes under the same
cast; an explicit ``.double()`` in model code would follow the model instead.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree

from revcompile.runtime.branches import fill_limit, finfo_limit

REF = "_revcompile_dtype"
TRACED = torch.float64
_LIMITS = {torch.finfo(TRACED).min: "min", torch.finfo(TRACED).max: "max"}
# Ops that write a scalar into a tensor: (tensor argument, value argument).
_FILLS = {
    torch.ops.aten.masked_fill.Scalar: (0, 2),
    torch.ops.aten.masked_fill_.Scalar: (0, 2),
    torch.ops.aten.fill.Scalar: (0, 1),
    torch.ops.aten.fill_.Scalar: (0, 1),
    torch.ops.aten.where.ScalarOther: (1, 2),
    torch.ops.aten.where.ScalarSelf: (2, 1),
}


def follow_model_dtype(gm: fx.GraphModule) -> int:
    """Rewrite `gm` (exported in float64) to compute in ``gm.<REF>.dtype``; returns the
    number of constants that now follow it. `gm` must carry the `REF` buffer."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and "_assert_tensor_metadata" in str(node.target):
            graph.erase_node(node)  # a check of the traced dtypes, nothing more
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        ref = graph.get_attr(REF)
        dtype = graph.call_function(getattr, (ref, "dtype"))
    limits: dict[str, fx.Node] = {}
    count = 0

    def follow(value: object) -> object:
        nonlocal count
        if value is TRACED:
            count += 1
            return dtype
        if isinstance(value, float) and value in _LIMITS:
            count += 1
            which = _LIMITS[value]
            if which not in limits:
                with graph.inserting_after(dtype):
                    limits[which] = graph.call_function(finfo_limit, (dtype, which))
            return limits[which]
        return value

    for node in list(graph.nodes):
        if node in (ref, dtype) or node in limits.values():
            continue
        node.args = pytree.tree_map(follow, node.args)
        node.kwargs = pytree.tree_map(follow, node.kwargs)
    _clip_fills(graph, limits, dtype)
    if not count:
        graph.erase_node(dtype)
        graph.erase_node(ref)
    gm.recompile()
    return count


def _clip_fills(graph: fx.Graph, limits: dict[str, fx.Node], dtype: fx.Node) -> None:
    """A limit written into a tensor follows that tensor's dtype where it is narrower
    than the model's (autocast: `fill_limit`); elsewhere it stays the model's."""
    which_of = {node: which for which, node in limits.items()}
    for node in list(graph.nodes):
        positions = _FILLS.get(node.target) if node.op == "call_function" else None
        if positions is None or len(node.args) <= max(positions):
            continue
        target, value = (node.args[i] for i in positions)
        if value not in which_of or not isinstance(target, fx.Node):
            continue
        with graph.inserting_before(node):
            clipped = graph.call_function(fill_limit, (target, dtype, which_of[value]))
        args = list(node.args)
        args[positions[1]] = clipped
        node.args = tuple(args)
    for limit in limits.values():
        if not limit.users:
            graph.erase_node(limit)
