"""Reversible backward vs storing mode: same outputs, input and parameter gradients."""

from __future__ import annotations

import pytest
import torch

import revcompile
from tests.helpers import assert_matches_storing
from tests.runtime.blocks import attention_stage, conv_stage, mlp_stage, padding_mask

F64 = torch.float64
# float64 agrees to ~1e-10 relative: the only difference is rounding in
# x1 = (x1 + f) - f.
RTOL_F64 = 1e-10
# float32: each coupling's inverse loses ~eps(fp32) = 1.2e-7 times the branch
# magnitude; BatchNorm's 1/std and N couplings amplify it, so 1e-4 relative leaves a
# 50x margin over the worst seen for 4-coupling stages here (1.9e-6).
RTOL_F32 = 1e-4


@pytest.mark.parametrize("n", [1, 3])
def test_conv_stage_float64(n: int) -> None:
    """BasicBlock-style couplings (conv-BN-ReLU-conv-BN) in train mode."""
    stage = conv_stage(n).double()
    x = torch.randn(4, 16, 6, 6, dtype=F64, requires_grad=True)
    assert_matches_storing(stage, x, rtol=RTOL_F64)


def test_mlp_stage_with_dropout_float64() -> None:
    """LayerNorm-MLP couplings with dropout: masks must be replayed exactly."""
    stage = mlp_stage(3, p=0.3).double()
    x = torch.randn(3, 5, 16, dtype=F64, requires_grad=True)
    assert_matches_storing(stage, x, rtol=RTOL_F64)


def test_attention_stage_with_mask_context_float64() -> None:
    """Attention F reads a padding mask passed as stage context."""
    stage = attention_stage(2).double()
    x = torch.randn(4, 6, 16, dtype=F64, requires_grad=True)
    assert_matches_storing(stage, x, padding_mask(4, 6, F64), rtol=RTOL_F64)


def test_context_that_requires_grad_gets_its_gradient() -> None:
    """A learned bias computed outside the stage and passed as context."""
    stage = attention_stage(2).double()
    x = torch.randn(2, 6, 16, dtype=F64, requires_grad=True)
    bias = torch.randn(2, 1, 6, dtype=F64, requires_grad=True)
    assert_matches_storing(stage, x, bias, rtol=RTOL_F64)


def test_conv_stage_float32() -> None:
    stage = conv_stage(4)
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    assert_matches_storing(stage, x, rtol=RTOL_F32)


def test_uneven_split_float64() -> None:
    """C = 9 splits into (4, 5): F maps 5 -> 4 channels, G maps 4 -> 5."""
    couplings = [
        revcompile.AdditiveCoupling(torch.nn.Linear(5, 4), torch.nn.Linear(4, 5))
        for _ in range(3)
    ]
    stage = revcompile.ReversibleStage(couplings, dim=-1).double()
    x = torch.randn(3, 9, dtype=F64, requires_grad=True)
    assert_matches_storing(stage, x, rtol=RTOL_F64)
    explicit = revcompile.ReversibleStage(
        [revcompile.AdditiveCoupling(torch.nn.Linear(6, 3), torch.nn.Linear(3, 6))],
        dim=-1,
        split_sizes=(3, 6),
    ).double()
    assert_matches_storing(explicit, x, rtol=RTOL_F64)


def test_non_contiguous_and_channels_last_inputs() -> None:
    stage = conv_stage(2).double()
    base = torch.randn(4, 16, 6, 6, dtype=F64)
    cl = base.to(memory_format=torch.channels_last).requires_grad_(True)
    assert_matches_storing(stage, cl, rtol=RTOL_F64)
    transposed = torch.randn(4, 16, 6, 6, dtype=F64).transpose(2, 3)
    assert not transposed.is_contiguous()
    assert_matches_storing(stage, transposed.requires_grad_(True), rtol=RTOL_F64)


def test_input_without_grad_still_gives_parameter_gradients() -> None:
    stage = conv_stage(2).double()
    x = torch.randn(2, 16, 5, 5, dtype=F64)  # requires_grad=False
    rev = assert_matches_storing(stage, x, rtol=RTOL_F64)
    assert all(p.grad is not None for p in rev.parameters())


def test_frozen_parameters_get_no_gradient() -> None:
    stage = conv_stage(2).double()
    for coupling in stage.couplings:
        for p in coupling.F.parameters():
            p.requires_grad_(False)
    x = torch.randn(2, 16, 5, 5, dtype=F64, requires_grad=True)
    rev = assert_matches_storing(stage, x, rtol=RTOL_F64)
    for coupling in rev.couplings:
        assert all(p.grad is None for p in coupling.F.parameters())
        assert all(p.grad is not None for p in coupling.G.parameters())
