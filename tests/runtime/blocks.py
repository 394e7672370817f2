"""Small F/G branches used across runtime tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import revcompile


def conv_branch(c: int) -> nn.Module:
    """BasicBlock-style branch: conv-BN-ReLU-conv-BN."""
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        nn.BatchNorm2d(c),
    )


def mlp_branch(d: int, p: float = 0.1) -> nn.Module:
    """Transformer MLP branch: LayerNorm-Linear-GELU-Dropout-Linear-Dropout."""
    return nn.Sequential(
        nn.LayerNorm(d),
        nn.Linear(d, 2 * d),
        nn.GELU(),
        nn.Dropout(p),
        nn.Linear(2 * d, d),
        nn.Dropout(p),
    )


class MaskedAttention(nn.Module):
    """Single-head attention over tokens with an additive mask given as context."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # (B, T, D) -> 3 x (B, T, D); mask: (B, 1, T) additive
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + mask
        return self.out(scores.softmax(-1) @ v)


class ContextMLP(nn.Module):
    """MLP that ignores a context argument (G beside an attention F)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.mlp = mlp_branch(d, p=0.0)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.mlp(x)


def conv_stage(n: int, c: int = 8) -> revcompile.ReversibleStage:
    return revcompile.ReversibleStage(
        [revcompile.AdditiveCoupling(conv_branch(c), conv_branch(c)) for _ in range(n)]
    )


def mlp_stage(n: int, d: int = 8, p: float = 0.1) -> revcompile.ReversibleStage:
    return revcompile.ReversibleStage(
        [
            revcompile.AdditiveCoupling(mlp_branch(d, p), mlp_branch(d, p))
            for _ in range(n)
        ],
        dim=-1,
    )


def attention_stage(n: int, d: int = 8) -> revcompile.ReversibleStage:
    return revcompile.ReversibleStage(
        [
            revcompile.AdditiveCoupling(MaskedAttention(d), ContextMLP(d))
            for _ in range(n)
        ],
        dim=-1,
    )


def padding_mask(b: int, t: int, dtype: torch.dtype) -> Tensor:
    """(B, 1, T) additive mask hiding the last two tokens of every other sequence."""
    mask = torch.zeros(b, 1, t, dtype=dtype)
    mask[::2, :, -2:] = -1e9
    return mask
