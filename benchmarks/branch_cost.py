"""Parameters and FLOPs of a converted coupling's F + G against the original branch.

    python benchmarks/branch_cost.py

F and G's input and output layers are sliced to half the channels (Note [Slice,
don't pad] in passes/restrict.py); the layers in between keep the hidden width
whole (hidden="full"), narrow it until F+G cost at most the branch where they would
cost more (hidden="auto", the default), or split it between F and G
(hidden="partition"): Note [Hidden width] in passes/hidden.py. This prints what
each costs per block type.
"""

from __future__ import annotations

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import Tensor, fx, nn
from torch.utils.flop_counter import FlopCounterMode

from revcompile.passes.channel_split import split_branch


class _Scaled(nn.Module):
    """ConvNeXt's branch: layer_scale * block(x) (drop-path is identity here)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block, self.layer_scale = block.block, block.layer_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.layer_scale * self.block(x)


class _Attention(nn.Module):
    """ViT's attention branch: ln -> multi-head self-attention."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.ln, self.attn = layer.ln_1, layer.self_attention

    def forward(self, x: Tensor) -> Tensor:
        y = self.ln(x)
        return self.attn(y, y, y, need_weights=False)[0]


class _Mlp(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.ln, self.mlp = layer.ln_2, layer.mlp

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln(x))


def _branches() -> list[tuple[str, nn.Module, Tensor, int]]:
    r18 = torchvision.models.resnet18().layer1[0]
    r50 = torchvision.models.resnet50().layer1[1]
    vit = torchvision.models.vit_b_16().encoder.layers[0]
    basic = nn.Sequential(r18.conv1, r18.bn1, nn.ReLU(), r18.conv2, r18.bn2)
    bottleneck = nn.Sequential(
        r50.conv1, r50.bn1, nn.ReLU(), r50.conv2, r50.bn2, nn.ReLU(), r50.conv3, r50.bn3
    )
    inverted = torchvision.models.mobilenet_v2().features[3].conv
    convnext = _Scaled(torchvision.models.convnext_tiny().features[1][0])
    tokens = torch.randn(2, 197, 768)
    return [
        ("BasicBlock (resnet18)", basic, torch.randn(2, 64, 56, 56), 1),
        ("Bottleneck (resnet50)", bottleneck, torch.randn(2, 256, 56, 56), 1),
        ("Inverted residual (mobilenet_v2)", inverted, torch.randn(2, 24, 56, 56), 1),
        ("ConvNeXt block (tiny)", convnext, torch.randn(2, 96, 56, 56), 1),
        ("ViT MLP (b_16)", _Mlp(vit), tokens, -1),
        ("ViT attention (b_16)", _Attention(vit), tokens, -1),
    ]


def _flops(module: nn.Module, x: Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    hiddens = ("full", "auto", "partition")
    table = Table(title="F + G against the original branch: params / FLOPs")
    for col in ("block", *(f"hidden={h}" for h in hiddens)):
        table.add_column(col)
    for name, branch, x, dim in _branches():
        branch.eval()
        gm = fx.symbolic_trace(branch)
        c = x.shape[dim]
        x2, x1 = x.narrow(dim, c // 2, c - c // 2), x.narrow(dim, 0, c // 2)
        cells = []
        for hidden in hiddens:
            sizes = (c // 2, c - c // 2)
            f, g = split_branch(gm, (x,), dim=dim, sizes=sizes, hidden=hidden)
            params = (_params(f.module) + _params(g.module)) / _params(branch)
            flops = (_flops(f.module, x2) + _flops(g.module, x1)) / _flops(branch, x)
            cells.append(f"{params:.2f} / {flops:.2f}")
        table.add_row(name, *cells)
    Console().print(table)


if __name__ == "__main__":
    main()
