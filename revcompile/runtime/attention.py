"""`nn.MultiheadAttention` restricted to channel slices: an attention F or G.

A coupling half reads some channels of the stream and writes others. Fed the half
zero-padded back to all channels, multi-head attention would spend its whole input
projection on zeros and its whole output projection on channels that are narrowed
away. This module keeps only the columns of ``in_proj_weight`` that the half reads
and the rows of ``out_proj`` that it writes; the heads in between stay whole (see
Note [Slice, don't pad] in passes/restrict.py), so

    SlicedMultiheadAttention(m, in_sel, out_sel)(x, x, x, ...)[0]
        == narrow(m(pad(x), pad(x), pad(x), ...)[0], out_sel)

with the same attention weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Sel = tuple[int, int]  # [start, stop) of the embedding channels


def _param(p: Tensor, axis: int, sel: Sel | None) -> nn.Parameter:
    """A copy (never a view of the user's weights), narrowed to `sel` if given."""
    t = p.detach()
    if sel is not None:
        t = t.narrow(axis, sel[0], sel[1] - sel[0])
    return nn.Parameter(t.clone(), requires_grad=p.requires_grad)


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: do not attend) as an additive one, like MHA's."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class SlicedMultiheadAttention(nn.Module):
    """`m` reading embedding channels `in_sel` and writing channels `out_sel`.

    `m` is an `nn.MultiheadAttention` with packed projections and no ``bias_k`` /
    ``bias_v`` / ``add_zero_attn`` (ValueError otherwise, so the caller can fall back
    to padding), or a `SlicedMultiheadAttention` not yet sliced on the side asked for.
    """

    def __init__(
        self, m: nn.Module, in_sel: Sel | None = None, out_sel: Sel | None = None
    ) -> None:
        super().__init__()
        if isinstance(m, SlicedMultiheadAttention):
            if (in_sel is not None and m.in_sel is not None) or (
                out_sel is not None and m.out_sel is not None
            ):
                raise ValueError("attention is already sliced on that side")
            w_in, b_in = m.in_proj_weight, m.in_proj_bias
            w_out, b_out = m.out_proj_weight, m.out_proj_bias
        elif isinstance(m, nn.MultiheadAttention):
            if not m._qkv_same_embed_dim or m.in_proj_weight is None:
                raise ValueError("separate q/k/v projection weights (kdim/vdim)")
            if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
                raise ValueError("bias_k / bias_v / add_zero_attn")
            w_in, b_in = m.in_proj_weight, m.in_proj_bias
            w_out, b_out = m.out_proj.weight, m.out_proj.bias
        else:
            raise ValueError(f"not multi-head attention: {type(m).__name__}")
        self.embed_dim, self.num_heads = int(m.embed_dim), int(m.num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.dropout, self.batch_first = float(m.dropout), bool(m.batch_first)
        self.in_sel: Sel | None = in_sel or getattr(m, "in_sel", None)
        self.out_sel: Sel | None = out_sel or getattr(m, "out_sel", None)
        # (3E, C) -> (3E, n): the projection reads only the half's channels.
        self.in_proj_weight = _param(w_in, 1, in_sel)
        self.in_proj_bias = None if b_in is None else _param(b_in, 0, None)
        # (C, E) -> (n, E) and (C,) -> (n,): it writes only the half's channels.
        self.out_proj_weight = _param(w_out, 0, out_sel)
        self.out_proj_bias = None if b_out is None else _param(b_out, 0, out_sel)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"in_sel={self.in_sel}, out_sel={self.out_sel}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}"
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        q, k, v = self._project(query, key, value)
        if not batched:  # (L, E) -> (L, 1, E); MHA ignores batch_first here
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # (N, L, E) -> (L, N, E)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        tgt, bsz, _ = q.shape
        src, h = k.shape[0], self.num_heads
        mask, causal = self._mask(
            key_padding_mask, attn_mask, is_causal, need_weights, q.dtype, bsz, src
        )
        # (L, N, E) -> (N * heads, L, head_dim)
        q = q.reshape(tgt, bsz * h, self.head_dim).transpose(0, 1)
        k = k.reshape(src, bsz * h, self.head_dim).transpose(0, 1)
        v = v.reshape(src, bsz * h, self.head_dim).transpose(0, 1)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # explicit scores, as MHA computes them
            q = q * math.sqrt(1.0 / float(self.head_dim))
            kt = k.transpose(-2, -1)
            scores = torch.bmm(q, kt) if mask is None else torch.baddbmm(mask, q, kt)
            weights = F.softmax(scores, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt * bsz, -1)
            weights = weights.view(bsz, h, tgt, src)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if mask is not None:  # (1 | N * heads, L, S) -> (1 | N, 1 | heads, L, S)
                mask = (
                    mask.unsqueeze(0)
                    if mask.size(0) == 1
                    else mask.view(bsz, h, -1, src)
                )
            out = F.scaled_dot_product_attention(
                q.view(bsz, h, tgt, self.head_dim),
                k.view(bsz, h, src, self.head_dim),
                v.view(bsz, h, src, self.head_dim),
                mask,
                p,
                causal,
            )
            out = out.permute(2, 0, 1, 3).reshape(tgt * bsz, -1)
        out = F.linear(out, self.out_proj_weight, self.out_proj_bias)
        out = out.view(tgt, bsz, out.size(1))
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(
        self, query: Tensor, key: Tensor, value: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v with the full hidden width; one matmul for self-attention."""
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
            return q, k, v
        ws = w.chunk(3)
        bs = (None, None, None) if b is None else b.chunk(3)
        return (
            F.linear(query, ws[0], bs[0]),
            F.linear(key, ws[1], bs[1]),
            F.linear(value, ws[2], bs[2]),
        )

    def _mask(
        self,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
        need_weights: bool,
        dtype: torch.dtype,
        bsz: int,
        src: int,
    ) -> tuple[Tensor | None, bool]:
        """The additive mask, (1 | N * heads, L, S), and whether SDPA may take
        `is_causal` instead: MHA's rules, so both agree on every input."""
        kpm = _float_mask(key_padding_mask, dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if is_causal and kpm is None and not need_weights:
            return None, True
        mask = _float_mask(attn_mask, dtype)
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if kpm is not None:
            kpm = kpm.view(bsz, 1, 1, src).expand(-1, self.num_heads, -1, -1)
            kpm = kpm.reshape(bsz * self.num_heads, 1, src)
            mask = kpm if mask is None else mask + kpm
        return mask, False
