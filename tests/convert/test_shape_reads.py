"""Note [Shapes of replaced values]: a branch that reads the shape of one of its own
values."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import revcompile
from tests.helpers import assert_matches_storing


class SizedBlock(nn.Module):
    """EdgeNeXt's SplitTransposeBlock: the branch adds a positional encoding computed
    from the shape of one of its own values, outside the data flow of the stream."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.pos = nn.Conv2d(2, c, 1)  # a positional encoding, as EdgeNeXt's
        self.f = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        b, c, h, w = y.shape
        weight = self.pos.weight  # EdgeNeXt makes its tables where its weights are
        scale = torch.arange(2, device=weight.device, dtype=weight.dtype)
        grid = torch.ones((b, 2, h, w), device=weight.device, dtype=weight.dtype)
        pos = self.pos(grid * scale.view(1, 2, 1, 1))
        t = (y + pos).flatten(2).transpose(1, 2)  # (B, H*W, C)
        t = t + self.f(t)
        return x + t.transpose(1, 2).reshape(b, c, h, w)


class SizedNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(SizedBlock(c), SizedBlock(c), SizedBlock(c))
        self.head = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _grads(model: nn.Module, x: Tensor) -> dict[str, Tensor | None]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    (
        out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    ).sum().backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_a_branch_sized_from_its_own_shape_reads_keeps_no_second_copy_of_it() -> None:
    torch.manual_seed(0)
    model = SizedNet()
    x = torch.randn(2, 3, 5, 6)
    converted = revcompile.convert(model, x)
    stages = [
        m for m in converted.modules() if isinstance(m, revcompile.ReversibleStage)
    ]
    assert stages, "the two residuals convert"
    model, converted = model.double(), converted.double()
    x = x.double()
    assert_matches_storing(converted, x, rtol=1e-10)
    assert all(g is not None for g in _grads(model, x).values())
    unused = [n for n, g in _grads(converted, x).items() if g is None]
    assert not unused, f"the original trains these, the converted does not: {unused}"
