"""``hidden=``: how F and G share a branch's hidden width (Note [Hidden width])."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, fx, nn
from torchvision.models.resnet import Bottleneck

import revcompile
from revcompile.passes.channel_split import split_branch
from tests.helpers import assert_matches_storing


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class BottleneckBranch(nn.Module):
    """resnet50's branch: 1x1 down, 3x3, 1x1 up, each with BatchNorm."""

    def __init__(self, c: int, h: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h)
        self.conv2 = nn.Conv2d(h, h, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.conv3, self.bn3 = nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.bn3(self.conv3(y))


class InvertedSE(nn.Module):
    """An MBConv branch: expand, depthwise, squeeze-excite gate, project."""

    def __init__(self, c: int, h: int) -> None:
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h)
        self.dw = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.fc1, self.fc2 = nn.Conv2d(h, 4, 1), nn.Conv2d(4, h, 1)
        self.project, self.bn3 = nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.silu(self.bn1(self.expand(x)))
        y = nn.functional.silu(self.bn2(self.dw(y)))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), True)))))
        return self.bn3(self.project(y * gate))


class Heads(nn.Module):
    """Attention-like: the hidden value is reshaped into heads, so it stays whole."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, 2, -1).unbind(2)
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.proj(a.reshape(b, t, -1))


def _split(branch: nn.Module, x: Tensor, hidden: str | float) -> tuple:
    gm = fx.symbolic_trace(branch.eval())
    c = x.shape[1] if x.dim() == 4 else x.shape[-1]
    dim = 1 if x.dim() == 4 else -1
    return gm, *split_branch(
        gm, (x,), dim=dim, sizes=(c // 2, c - c // 2), hidden=hidden
    )


def _layers(half: fx.GraphModule, kind: type[nn.Module]) -> list[nn.Module]:
    """`half`'s layers of `kind`, in the order its graph runs them."""
    mods = [half.get_submodule(str(n.target)) for n in half.graph.nodes
            if n.op == "call_module"]  # fmt: skip
    return [m for m in mods if isinstance(m, kind)]


@pytest.mark.parametrize(
    ("branch", "c"), [(BottleneckBranch(32, 16), 32), (InvertedSE(16, 48), 16)]
)
def test_auto_fits_the_branch_full_does_not(branch: nn.Module, c: int) -> None:
    x = torch.randn(2, c, 6, 6)
    gm, f, g = _split(branch, x, "full")
    assert _params(f.module) + _params(g.module) > 1.1 * _params(gm)
    gm, f, g = _split(branch, x, "auto")
    ratio = (_params(f.module) + _params(g.module)) / _params(gm)
    assert 0.85 < ratio <= 1.0, (ratio, f.detail)
    assert "keep" in f.detail
    c1 = x.shape[1] // 2
    assert f.module(x[:, c1:]).shape == x[:, :c1].shape
    assert g.module(x[:, :c1]).shape == x[:, c1:].shape


def test_partition_gives_each_pretrained_unit_to_one_half() -> None:
    branch = BottleneckBranch(16, 8)
    x = torch.randn(2, 16, 5, 5)
    _, f, g = _split(branch, x, "partition")
    convs = [_layers(half.module, nn.Conv2d) for half in (f, g)]
    w = branch.conv1.weight  # (8 hidden, 16 stream)
    # F reads x2 (stream channels 8..16) into hidden units 0..4, G x1 into 4..8.
    torch.testing.assert_close(convs[0][0].weight, w[:4, 8:])
    torch.testing.assert_close(convs[1][0].weight, w[4:, :8])
    torch.testing.assert_close(convs[0][1].weight, branch.conv2.weight[:4, :4])
    torch.testing.assert_close(convs[1][1].weight, branch.conv2.weight[4:, 4:])
    bn = _layers(g.module, nn.BatchNorm2d)[0]
    torch.testing.assert_close(bn.running_mean, branch.bn1.running_mean[4:])


def test_a_hidden_value_reshaped_into_heads_stays_whole() -> None:
    x = torch.randn(2, 5, 8)
    _, f, _ = _split(Heads(8), x, "partition")
    assert "no hidden layer can be narrowed" in f.detail
    assert f.module(x[..., 4:]).shape == (2, 5, 4)


class Bottlenecks(nn.Module):
    """A stem and three torchvision Bottlenecks (hidden width = a quarter)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        )
        self.blocks = nn.Sequential(*(Bottleneck(32, 8) for _ in range(3)))
        self.fc = nn.Linear(32, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def _bottleneck_resnet() -> nn.Module:
    return Bottlenecks()


def test_default_convert_keeps_the_parameter_count() -> None:
    model = _bottleneck_resnet()
    x = torch.randn(2, 3, 8, 8)
    full = revcompile.convert(model, (x,), hidden="full")
    auto = revcompile.convert(model, (x,))
    assert _params(full) > 1.15 * _params(model)
    assert _params(auto) <= 1.01 * _params(model)


@pytest.mark.parametrize("hidden", ["auto", "partition", 0.7])
def test_narrowed_stages_are_exact_in_float64(hidden: str | float) -> None:
    model = _bottleneck_resnet().train()
    x = torch.randn(2, 3, 8, 8)
    converted = revcompile.convert(model, (x,), hidden=hidden).double()
    assert _params(converted) < _params(revcompile.convert(model, (x,), hidden="full"))
    assert_matches_storing(converted, x.double().requires_grad_(), rtol=1e-10)


def test_convert_in_train_mode_keeps_pretrained_batch_norm_statistics() -> None:
    """Probing F and G on the example must not move the running statistics they
    copy from the user's model (every derivation run was a train-mode forward)."""
    model = torchvision.models.resnet18(num_classes=4).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    converted = revcompile.convert(model, (torch.randn(2, 3, 8, 8),))
    stage = next(
        m for m in converted.modules() if isinstance(m, revcompile.ReversibleStage)
    )
    f = stage.couplings[0].F
    norms = _layers(f, nn.BatchNorm2d)
    block = model.layer1[0]
    torch.testing.assert_close(norms[0].running_mean, block.bn1.running_mean)
    torch.testing.assert_close(norms[1].running_mean, block.bn2.running_mean[:32])
    assert all(int(n.num_batches_tracked) == 0 for n in norms)


@pytest.mark.parametrize("bad", ["half", 0.3, 1.5, 2])
def test_bad_hidden_is_refused(bad: object) -> None:
    with pytest.raises(revcompile.ConversionError, match="hidden="):
        revcompile.convert(_bottleneck_resnet(), hidden=bad)  # type: ignore[arg-type]
