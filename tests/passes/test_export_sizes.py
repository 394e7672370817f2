"""Note [Sizes of one inside the model]: sizes the example brings to 1 inside it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import revcompile
from revcompile.passes.trace import trace


class PooledAttention(nn.Module):
    """timm's CPUBone ConvAttention: keys and values from a stride-4 projection, so a
    4-pixel example has one of each; the result is upsampled and cropped back."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c, 3 * c, 7, stride=4, padding=3)
        self.up = nn.ConvTranspose2d(c, c, 8, stride=4, padding=2, groups=c)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        if x.shape[-1] % 2:  # control flow on a size: symbolic tracing refuses it
            x = F.pad(x, (0, 1))
        qkv = self.proj(x)
        n, _, h, w = qkv.shape
        q, k, v = qkv.reshape(n, 2, -1, h * w).transpose(2, 3).chunk(3, dim=3)
        o = F.scaled_dot_product_attention(q, k, v)  # (n, 2, h*w, c/2)
        o = self.up(o.transpose(2, 3).reshape(n, -1, h, w))
        return x + o[..., : size[0], : size[1]]


def test_a_size_of_one_inside_the_model_stays_symbolic() -> None:
    torch.manual_seed(0)
    model = PooledAttention()
    traced = trace(model, (torch.randn(2, 8, 4, 4),))
    assert traced.tracer == "export"
    assert any("exported again" in n for n in traced.notes), traced.notes
    for shape in [(3, 8, 16, 16), (1, 8, 24, 8), (2, 8, 4, 4)]:
        x = torch.randn(shape)
        torch.testing.assert_close(traced.gm(x), model(x))


class Windowed(nn.Module):
    """EfficientViT-MSRA: a map of exactly one window attends as a whole, others are
    padded to windows first. Export keeps the branch the example took."""

    def __init__(self, c: int = 8, window: int = 4) -> None:
        super().__init__()
        self.window = window
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.g = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] == self.window:
            return x + self.f(x)
        return x + self.g(x)


def test_a_size_export_fixed_refuses_other_sizes_by_name() -> None:
    model = nn.Sequential(Windowed(), Windowed())
    converted = revcompile.convert(model, torch.randn(2, 8, 4, 4))
    assert converted(torch.randn(3, 8, 4, 4)).shape == (3, 8, 4, 4)  # batch: dynamic
    fixed = r"size 6 on dim 3, and torch.export fixed the graph to 4"
    with pytest.raises(revcompile.RevCompileError, match=fixed):
        converted(torch.randn(2, 8, 4, 6))
