"""Modules that read ``self.training`` when they run, standing in for calls whose
train/eval behaviour tracing froze into constants."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F


class AttentionDropout(nn.Module):
    """``F.scaled_dot_product_attention`` with ``dropout_p`` only in training.

    Models write ``dropout_p=self.p if self.training else 0.0``; a traced graph keeps
    the value seen at trace time, so eval() would still drop attention weights.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
        kw["dropout_p"] = self.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, **kw)
