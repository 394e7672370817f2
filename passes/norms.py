"""A post-join LayerNorm of the graph as an ``nn.LayerNorm`` (for fixed_point).

A fixed-point coupling keeps a post-norm block exactly, ``LN(x + f(x))``, inverting
the norm from its saved statistics; it needs the norm as a module. fx gives either the
user's ``nn.LayerNorm`` or an ``F.layer_norm`` call, torch.export an
``aten.layer_norm``; the latter two become a module holding the same parameters.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn
from torch.nn import functional as F

from revcompile.passes.ops import name

# (normalized_shape, weight, bias, eps) positions of layer_norm(input, ...).
_ARGS = ("normalized_shape", "weight", "bias", "eps")


def layer_norm_module(node: fx.Node, gm: fx.GraphModule) -> nn.LayerNorm | None:
    """The LayerNorm `node` computes, or None when it computes something else."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return m if type(m) is nn.LayerNorm else None
    if node.op != "call_function" or name(node) != "layer_norm":
        return None
    if node.target is not F.layer_norm and "aten" not in str(node.target):
        return None
    given = dict(zip(_ARGS, node.args[1:], strict=False)) | {
        k: v for k, v in node.kwargs.items() if k in _ARGS
    }
    weight, bias = (_attr(gm, given.get(k)) for k in ("weight", "bias"))
    if any(
        given.get(k) is not None and v is None
        for k, v in (("weight", weight), ("bias", bias))
    ) or (weight is None) != (bias is None):
        return None  # an affine from elsewhere, or only one of the two
    shape = tuple(given.get("normalized_shape") or ())
    norm = nn.LayerNorm(shape, eps=float(given.get("eps", 1e-5)),
                        elementwise_affine=weight is not None)  # fmt: skip
    if weight is not None:
        norm.weight, norm.bias = weight, bias
    return norm


def _attr(gm: fx.GraphModule, node: Any) -> nn.Parameter | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, nn.Parameter) else None
