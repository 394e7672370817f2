"""Give back to train()/eval() the choices tracing froze (Note [Export for training]).

Attention dropout is the one left after trace.py and export.py: ``dropout_p`` of
``scaled_dot_product_attention`` is a constant in both graph forms. Each call with a
nonzero constant becomes an `AttentionDropout` module call.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.nn import functional as F

from revcompile.runtime.modes import AttentionDropout

_SDPA = (
    F.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
)
# aten.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
#                                   *, scale, enable_gqa)
_NAMES = ("attn_mask", "dropout_p", "is_causal")


def attention_dropout_modules(gm: fx.GraphModule) -> list[str]:
    """Swap SDPA calls with a constant ``dropout_p > 0``; returns notes."""
    swapped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        kwargs = dict(node.kwargs)
        for name, value in zip(_NAMES, node.args[3:], strict=False):
            kwargs[name] = value
        p = kwargs.pop("dropout_p", 0.0)
        if not isinstance(p, float | int) or p == 0:
            continue
        name = f"revcompile_{node.name}"
        gm.add_submodule(name, AttentionDropout(float(p)))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, tuple(node.args[:3]), kwargs)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        swapped += 1
    if swapped:
        gm.recompile()
        return [f"{swapped} attention dropouts follow train()/eval()"]
    return []
