"""check_reconstruction reports per-stage numbers and catches a branch that drifts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import revcompile
from tests.runtime.blocks import conv_stage, mlp_stage


class Model(nn.Module):
    """A stem, two reversible stages and a head."""

    def __init__(self, second: revcompile.ReversibleStage) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.first = conv_stage(2)
        self.second = second

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(self.stem(x)))


def test_reports_every_stage_and_leaves_the_model_alone() -> None:
    model = Model(conv_stage(3)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(3)
    results = revcompile.check_reconstruction(model, x)
    after = torch.rand(3)
    assert [(r.path, r.couplings) for r in results] == [("first", 2), ("second", 3)]
    assert all(r.ok and r.max_abs_error < 1e-12 for r in results)
    assert "max |x - inverse(forward(x))|" in str(results[0])
    for k, v in state.items():  # BatchNorm statistics untouched
        assert torch.equal(model.state_dict()[k], v), k
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(3))  # global RNG untouched


def test_dropout_is_replayed_during_the_check() -> None:
    stage = mlp_stage(4, p=0.5)
    (r,) = revcompile.check_reconstruction(stage, torch.randn(3, 5, 16))
    assert r.ok and r.dtype == torch.float32


class Noisy(nn.Module):
    """A branch that draws from its own generator: not replayable, so it drifts."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) + torch.rand(x.shape, generator=self.gen)


def test_drift_raises_with_numbers() -> None:
    stage = revcompile.ReversibleStage(
        [revcompile.AdditiveCoupling(Noisy(), Noisy()) for _ in range(2)], dim=-1
    )
    with pytest.raises(revcompile.ReconstructionError) as info:
        revcompile.check_reconstruction(stage, torch.randn(4, 16))
    message = str(info.value)
    assert "<root>: 2 couplings, torch.float32" in message
    assert "OVER TOLERANCE" in message and "storing_activations" in message
    assert isinstance(info.value, ArithmeticError)
