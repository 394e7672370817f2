"""The memory planner: reversible, checkpoint or store per block under a budget."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import Tensor, nn

import revcompile
from revcompile.passes.ir import Policy
from revcompile.runtime.checkpoint import CheckpointedBlock
from tests.helpers import assert_matches_storing
from tests.models import NanoGPT, PreActResNet


def _resnet() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)


def _saved(model: nn.Module, x: Tensor) -> int:
    """Bytes the model saves for backward, each storage once, parameters aside."""
    params = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if id(t) not in params and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def test_a_budget_of_one_keeps_the_original() -> None:
    model, x = _resnet()
    converted = revcompile.convert(model, (x,), memory_budget=1.0)
    plan = converted.revcompile_plan
    assert not plan.stages and {b.policy for b in plan.blocks} == {Policy.STORE}
    assert not any(
        isinstance(m, revcompile.ReversibleStage) for m in converted.modules()
    )
    model.eval(), converted.eval()
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))


def test_by_default_kept_blocks_are_checkpointed_exactly_once() -> None:
    model, x = _resnet()
    converted = revcompile.convert(model, (x,)).double()
    policies = [b.policy for b in converted.revcompile_plan.blocks]
    assert policies.count(Policy.CHECKPOINT) == 3  # the projection blocks
    assert policies.count(Policy.REVERSIBLE) == 5
    assert sum(isinstance(m, CheckpointedBlock) for m in converted.modules()) == 3
    # Gradients and batch-norm statistics (updated once) as storing mode's.
    assert_matches_storing(converted, x.double(), rtol=1e-10)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (PreActResNet(depth=3), torch.randn(4, 3, 16, 16)),
        _resnet,
        lambda: (NanoGPT(layers=3, dropout=0.0), torch.randint(0, 64, (4, 16))),
    ],
    ids=["preact", "resnet18", "nanogpt"],
)
@pytest.mark.parametrize("budget", [None, 0.6, 1.0])
def test_predicted_activation_memory_matches_what_autograd_saves(make, budget) -> None:
    model, x = make()
    converted = revcompile.convert(model, (x,), memory_budget=budget)
    plan = converted.revcompile_plan
    measured = _saved(converted, x)
    assert plan.original_bytes == pytest.approx(_saved(model, x), rel=0.02)
    assert plan.predicted_bytes == pytest.approx(measured, rel=0.15)
    if budget is not None and budget < 1:
        assert measured <= 1.15 * budget * plan.original_bytes


def test_smaller_budgets_recompute_more_and_keep_less() -> None:
    torch.manual_seed(0)
    model, x = PreActResNet(depth=4), torch.randn(2, 3, 16, 16)
    kept, recomputed = [], []
    for budget in (1.0, 0.8, 0.5, 0.3):
        plan = revcompile.analyze(model, (x,), memory_budget=budget)
        kept.append(plan.predicted_bytes)
        recomputed.append(sum(b.recompute_flops for b in plan.blocks))
        assert plan.predicted_bytes <= budget * plan.original_bytes or budget == 0.3
    assert kept == sorted(kept, reverse=True) and recomputed == sorted(recomputed)
    # A budget between converts only what it needs: the function changes least.
    mid = revcompile.analyze(model, (x,), memory_budget=0.8)
    full = revcompile.analyze(model, (x,))
    assert len(mid.converted) < len(full.converted)


def test_a_checkpointed_block_replays_dropout_and_refuses_double_backward() -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    block = CheckpointedBlock(body).double()
    x = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    reference = copy.deepcopy(block)
    assert_matches_storing(block, x, rtol=1e-12)
    reference.train()
    y = CheckpointedBlock(nn.Linear(8, 8).double())(x)
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=False)
    assert grad.shape == x.shape
    with pytest.raises(revcompile.DoubleBackwardError):
        torch.autograd.grad(
            CheckpointedBlock(nn.Linear(8, 8).double())(x).sum(), x, create_graph=True
        )


def test_bad_budgets_are_refused() -> None:
    model, x = _resnet()
    for bad in (0.0, 1.5, -3, "half"):
        with pytest.raises(revcompile.ConversionError, match="memory_budget"):
            revcompile.convert(model, (x,), memory_budget=bad)
