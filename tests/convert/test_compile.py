"""torch.compile over a converted model: equal gradients, few graph breaks, the
memory advantage kept (Note [Stages under torch.compile])."""

from __future__ import annotations

import copy

import pytest
import torch

import revcompile
from tests.helpers import rel_err, saved_bytes
from tests.models import PreActResNet


@pytest.fixture(scope="module")
def converted() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    return revcompile.convert(PreActResNet(depth=4, width=8), (x,)), x


def test_at_most_one_graph_break_per_stage_or_checkpoint(converted) -> None:
    """Each stage and each checkpointed block runs outside dynamo; nothing else
    breaks the graph."""
    model, x = converted
    plan = model.revcompile_plan
    checkpoints = [b for b in plan.blocks if b.policy.value == "checkpoint"]
    assert len(plan.stages) == 2 and len(checkpoints) == 1
    torch._dynamo.reset()
    explained = torch._dynamo.explain(copy.deepcopy(model))(x)
    assert 1 <= explained.graph_break_count <= len(plan.stages) + len(checkpoints)
    assert all("torch.compiler.disable" in r.reason for r in explained.break_reasons)


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "rtol"), [("aot_eager", 1e-6), ("inductor", 1e-4)])
def test_compiled_gradients_equal_eager(converted, backend: str, rtol: float) -> None:
    """float32; inductor fuses and reorders reductions, hence its looser tolerance."""
    model, x = converted
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend=backend)
    eager = copy.deepcopy(model)
    xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    compiled(xc).square().sum().backward()
    eager(xe).square().sum().backward()
    assert rel_err(xc.grad, xe.grad) < rtol
    for a, b in zip(compiled.parameters(), eager.parameters(), strict=True):
        assert rel_err(a.grad, b.grad) < rtol


def test_compiled_model_keeps_the_memory_advantage(converted) -> None:
    model, x = converted
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    xs = x.repeat(4, 1, 1, 1)

    def storing() -> torch.Tensor:
        with revcompile.storing_activations():
            return compiled(xs)

    reversible = saved_bytes(lambda: compiled(xs))
    assert reversible < 0.5 * saved_bytes(storing)
