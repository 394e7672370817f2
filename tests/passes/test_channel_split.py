"""Deriving F and G from a branch: sliced where possible, always the right shape."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, fx, nn

from revcompile.passes.channel_split import split_branch
from revcompile.runtime.branches import PaddedBranch


def _split(
    branch: nn.Module, *example: Tensor, dim: int, hidden: str = "auto"
) -> tuple:
    gm = fx.symbolic_trace(branch.eval())
    c = example[0].shape[dim]
    sizes = (c // 2, c - c // 2)
    return gm, *split_branch(gm, example, dim=dim, sizes=sizes, hidden=hidden)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class Basic(nn.Module):
    """BasicBlock branch: conv-BN-ReLU-conv-BN."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class PreNormMLP(nn.Module):
    """Transformer MLP branch: LayerNorm-Linear-GELU-Linear."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln, self.fc, self.proj = (
            nn.LayerNorm(d),
            nn.Linear(d, 4 * d),
            nn.Linear(4 * d, d),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(nn.functional.gelu(self.fc(self.ln(x))))


def _randomise_norms(m: nn.Module) -> nn.Module:
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    return m


@pytest.mark.parametrize(
    ("name", "branch", "shape"),
    [
        ("basic", lambda: _randomise_norms(Basic(8)), (2, 8, 5, 5)),
        (
            "inverted_residual",
            lambda: _randomise_norms(
                torchvision.models.mobilenet_v2().features[3].conv
            ),
            (2, 24, 6, 6),
        ),
    ],
)
def test_sliced_equals_padded_when_the_branch_opens_with_a_mixing_layer(
    name: str, branch, shape: tuple[int, ...]
) -> None:
    """Slicing a conv's input channels is exactly zero-padding its input (at full
    hidden width: narrowing it is another function, tests/passes/test_hidden.py)."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    gm, f, g = _split(branch(), x, dim=1, hidden="full")
    assert (f.method, g.method) == ("sliced", "sliced")
    c = x.shape[1]
    c1 = c // 2
    x1, x2 = x[:, :c1], x[:, c1:]
    with torch.no_grad():
        torch.testing.assert_close(
            f.module(x2), PaddedBranch(gm, 1, c, c1, (0, c1))(x2)
        )
        torch.testing.assert_close(g.module(x1), PaddedBranch(gm, 1, c, 0, (c1, c))(x1))
    # Full hidden width: F+G hold about the parameters of the original branch.
    ratio = (_n_params(f.module) + _n_params(g.module)) / _n_params(gm)
    assert 0.95 < ratio < 1.3, ratio


def test_pre_norm_mlp_slices_norm_and_both_linears() -> None:
    x = torch.randn(2, 5, 16)
    gm, f, _g = _split(PreNormMLP(16), x, dim=-1)
    assert f.method == "sliced" and f.detail == "2 layers sliced"
    ln = next(m for m in f.module.modules() if isinstance(m, nn.LayerNorm))
    assert ln.normalized_shape == (8,)
    assert f.module(x[..., 8:]).shape == (2, 5, 8)
    # The warm start copies the original weights: F's first linear is a column slice.
    fc = next(m for m in f.module.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(fc.weight, gm.fc.weight[:, 8:])


def test_uneven_split_and_convnext_layer_scale() -> None:
    """ConvNeXt: depthwise conv, permute, LayerNorm, layer-scale parameter."""
    block = torchvision.models.convnext_tiny().features[1][0]

    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block, self.layer_scale = block.block, block.layer_scale

        def forward(self, x: Tensor) -> Tensor:
            return self.layer_scale * self.block(x)

    x = torch.randn(2, 96, 6, 6)
    gm = fx.symbolic_trace(Branch().eval())
    f, g = split_branch(gm, (x,), dim=1, sizes=(47, 49))
    assert (f.method, g.method) == ("sliced", "sliced")
    assert f.module(x[:, 47:]).shape == (2, 47, 6, 6)
    assert g.module(x[:, :47]).shape == (2, 49, 6, 6)


class Opaque(nn.Module):
    """A branch with an op the splitter has no rule for: a cumsum over channels."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.cumsum(x, dim=-1))


def test_unknown_op_gets_a_zero_padded_input_not_a_crash() -> None:
    x = torch.randn(3, 10)
    _, f, g = _split(Opaque(10), x, dim=-1)
    assert f.method == "sliced" and "zero-padded into cumsum" in f.detail
    assert f.module(x[:, 5:]).shape == (3, 5) and g.module(x[:, :5]).shape == (3, 5)


def test_export_graph_of_a_gpt2_mlp_is_sliced() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_head=2, n_layer=1, use_cache=False)
    block = transformers.models.gpt2.modeling_gpt2.GPT2Block(cfg).eval()

    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln, self.mlp = block.ln_2, block.mlp

        def forward(self, x: Tensor) -> Tensor:
            return self.mlp(self.ln(x))

    x = torch.randn(2, 5, 16)
    gm = torch.export.export(Branch(), (x,), strict=False).module()
    f, _g = split_branch(gm, (x,), dim=-1, sizes=(8, 8))
    assert (f.method, f.detail) == ("sliced", "2 layers sliced")
    assert f.module(x[..., 8:]).shape == (2, 5, 8)
