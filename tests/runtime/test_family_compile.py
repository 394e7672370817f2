"""torch.compile around stages of the non-additive families: the stage is one graph
break (Note [Stages under torch.compile]) and gradients equal eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from tests.helpers import rel_err
from tests.runtime.families import causal_mask, stage


class Model(nn.Module):
    """A linear stem, one decoder stage of `name`, a linear head."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.stem = nn.Linear(5, 9)
        self.stage = stage(name, "decoder", p=0.1).float()
        self.head = nn.Linear(9, 3)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.head(torch.relu(self.stage(self.stem(x), mask)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["twin", "momentum", "fixed_point"])
def test_aot_eager_gradients_equal_eager(name: str) -> None:
    torch.manual_seed(0)
    model = Model(name)
    x, mask = torch.randn(4, 6, 5), causal_mask(6, torch.float32)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(copy.deepcopy(model))(x, mask)
    assert explained.graph_break_count == 1
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    eager = copy.deepcopy(model)
    grads = []
    for m in (compiled, eager):
        torch.manual_seed(1)  # the same dropout masks in both
        xi = x.clone().requires_grad_(True)
        m(xi, mask).square().sum().backward()
        grads.append([xi.grad, *(p.grad for p in m.parameters())])
    for a, b in zip(*grads, strict=True):
        assert rel_err(a, b) < 1e-6
