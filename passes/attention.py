"""Multi-head attention in a symbolically traced branch, for the channel split.

`nn.MultiheadAttention` mixes channels twice: its input projection reads the stream
and its output projection writes the branch output. The split slices both into a
`SlicedMultiheadAttention` (see Note [Slice, don't pad] in restrict.py) where the
call reads the stream as query, key and value alike and its output is taken as
``attn(...)[0]``. torch.export graphs hold the decomposed aten ops instead, which the
split treats op by op.
"""

from __future__ import annotations

import operator

from torch import fx, nn

from revcompile.passes.slicing import Sel
from revcompile.runtime.attention import SlicedMultiheadAttention

_QKV = ("query", "key", "value")


def _is_attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention | SlicedMultiheadAttention)


def attention_width(m: nn.Module) -> int | None:
    """The embedding width an attention module reads and writes, None for others."""
    return int(m.embed_dim) if _is_attention(m) else None


def reads_as_qkv(node: fx.Node, src: fx.Node) -> bool:
    """`node` takes `src` as query, key and value, and nowhere else."""
    bound = [
        node.args[i] if i < len(node.args) else node.kwargs.get(name)
        for i, name in enumerate(_QKV)
    ]
    uses = [a for a in (*node.args, *node.kwargs.values()) if a is src]
    return all(a is src for a in bound) and len(uses) == len(_QKV)


def attention_call(node: fx.Node, root: nn.Module) -> fx.Node | None:
    """The attention call whose output `node` is (``getitem(attn, 0)``), if every
    other reader of that call only takes the weights, which no slice changes."""
    if node.target is not operator.getitem or len(node.args) != 2:
        return None
    call, index = node.args
    if not isinstance(call, fx.Node) or index != 0 or call.op != "call_module":
        return None
    if not _is_attention(root.get_submodule(str(call.target))):
        return None
    for user in call.users:
        weights = user.target is operator.getitem and user.args[1:] == (1,)
        if user is not node and not weights:
            return None
    return call


def sliced_attention(
    m: nn.Module, in_sel: Sel | None, out_sel: Sel | None
) -> nn.Module | None:
    """`m` (whole or already sliced on the other side) restricted further; None where
    it cannot be: kdim/vdim, bias_k/bias_v, add_zero_attn, a side sliced twice."""
    try:
        return SlicedMultiheadAttention(m, in_sel, out_sel)
    except ValueError:
        return None
