"""Forward FLOPs of graph nodes from their shapes: the planner's recompute cost.

Channel-mixing ops dominate a block's time, so they are counted exactly (a multiply
and an add per weight per output position); every other op counts one FLOP per
output element. Both graph forms: fx's modules and functions, export's ATen ops.
"""

from __future__ import annotations

import math

from torch import fx, nn

from revcompile.passes.meta import output_bytes, tensor_info
from revcompile.passes.ops import module, name

_MATMULS = {"linear", "addmm", "mm", "matmul", "bmm", "baddbmm"}
_CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}


def node_flops(node: fx.Node, gm: fx.GraphModule) -> int:
    out = tensor_info(node)
    if out is None:
        return 0
    numel = math.prod(out.shape)
    mod = module(node, gm)
    if mod is not None:
        if isinstance(mod, nn.Linear):
            return 2 * numel * mod.in_features
        if isinstance(mod, nn.modules.conv._ConvNd):
            per = mod.in_channels // mod.groups * math.prod(mod.kernel_size)
            return 2 * numel * per
        if isinstance(mod, nn.MultiheadAttention):
            return 8 * numel * mod.embed_dim  # projections and attention, roughly
        return numel
    op = name(node)
    if op in _MATMULS or op in _CONVS:
        weight = node.args[1] if len(node.args) > 1 else None
        w = tensor_info(weight) if isinstance(weight, fx.Node) else None
        if w is not None and len(w.shape) >= 2:
            per = (
                math.prod(w.shape[1:])
                if op in _CONVS
                else w.shape[-1 if op == "linear" else 0]
            )
            return 2 * numel * per
        return 2 * numel * (out.shape[-1] if out.shape else 1)
    if op == "scaled_dot_product_attention":
        q = tensor_info(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        keys = q.shape[-2] if q is not None and len(q.shape) >= 2 else 1
        return 4 * numel * keys
    return numel if output_bytes(node) else 0


def flops(names: list[str] | tuple[str, ...], gm: fx.GraphModule) -> int:
    nodes = {n.name: n for n in gm.graph.nodes}
    return sum(node_flops(nodes[n], gm) for n in names if n in nodes)
