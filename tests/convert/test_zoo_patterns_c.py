"""Zoo failure patterns, each on a small hand-written module.

- Values made from a branch's own shapes (Llama 4's ``full_like(router_logits)``, a
  gated delta net's ``zeros_like`` output buffer written through a view) are part of
  the branch, not context (Note [Shape-derived context] in passes/analyze.py).
- Sizes torch.export takes to be one (a batch-1 position table traced beside a batch
  of 2) are part of the call pattern (Note [Sizes the graph takes to be equal] in
  revcompile/runtime/calls.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import revcompile
from revcompile.errors import CallPatternError
from revcompile.passes.export import export_graph


class RouterBlock(nn.Module):
    """Top-k routing scores written into ``full_like(logits, -inf)`` (Llama 4)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.router = nn.Linear(d, 4, bias=False)
        self.experts = nn.Parameter(torch.randn(4, d, d) / d**0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        logits = self.router(h)
        top, index = logits.topk(2, dim=-1)
        scores = torch.full_like(logits, float("-inf")).scatter_(-1, index, top)
        weights = torch.sigmoid(scores)  # (n, s, 4)
        mixed = torch.einsum("nse,edk,nsd->nsk", weights, self.experts, h)
        return x + mixed


class BufferBlock(nn.Module):
    """An output buffer ``zeros_like(hidden)``, written through a view of it (a gated
    delta net's ``core_attn_out[:, :, i] = ...``); ``copy_`` as a method call, whose
    result nothing reads, lives as long as the buffer does."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(self.norm(x))
        out = torch.zeros_like(h)
        half = x.shape[-1]
        out.narrow(-1, 0, half).copy_(torch.tanh(h.narrow(-1, 0, half)))
        out.narrow(-1, half, half).copy_(torch.relu(h.narrow(-1, half, half)))
        return x + self.down(out)


class Net(nn.Module):
    def __init__(self, block: type[nn.Module], d: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(block(d) for _ in range(depth)))
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))


def _grads(model: nn.Module, x: Tensor, storing: bool = False) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    if storing:
        with revcompile.storing_activations():
            loss = model(x).square().mean()
    else:
        loss = model(x).square().mean()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("block", [RouterBlock, BufferBlock])
def test_shape_derived_values_are_part_of_the_branch(block: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = Net(block).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    converted = revcompile.convert(model, (x,))
    assert len(converted.revcompile_plan.stages) == 1
    assert len(converted.revcompile_plan.stages[0].blocks) == 3
    # The graph around the stage reads no weight of the blocks it replaced: each
    # parameter the converted model has gets a gradient, as in the original.
    original = _grads(copy.deepcopy(model), x)
    assert set(original) == {n for n, _ in model.named_parameters()}
    grads = _grads(converted, x)
    unused = {n for n, _ in converted.named_parameters()} - set(grads)
    assert not unused
    # ... and the gradient is the one plain autograd gives on the same graph.
    storing = _grads(converted, x, storing=True)
    assert grads.keys() == storing.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, storing[name], rtol=1e-6, atol=1e-9)
    # The buffer written through its views computes what the original computes in
    # the blocks' first coupling half: the output depends on every branch weight.
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "blocks" in n)


class Shift(nn.Module):
    """Adds a position table; ``b, s, d = x.shape`` is what symbolic tracing cannot
    do (it iterates a Proxy), so the layer is exported."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        b, s, d = x.shape
        return self.fc(x + pos).reshape(b, s, 2, d // 2).reshape(b, s, d)


def test_export_records_the_sizes_it_takes_to_be_equal() -> None:
    torch.manual_seed(0)
    layer = Shift(8)
    x, pos = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    exported = export_graph(layer, {"x": x, "pos": pos})
    pattern = exported.pattern
    assert pattern.mismatch({"x": x, "pos": pos}) is None
    other = torch.randn(3, 7, 8)
    assert pattern.mismatch({"x": other, "pos": other}) is None
    why = pattern.mismatch({"x": x, "pos": pos[:1]})
    assert why is not None and "['pos'] (dim 0)" in why and "2 and 1" in why


class PosNet(nn.Module):
    """Blocks that read a position table made from ``position_ids`` of the batch's
    size or of batch 1 (broadcast), as transformers' rotary tables are."""

    def __init__(self, d: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.register_buffer("freq", torch.linspace(0.1, 1.0, d))
        self.layers = nn.ModuleList(PosLayer(d) for _ in range(depth))

    def forward(self, x: Tensor, position_ids: Tensor) -> Tensor:
        pos = torch.sin(position_ids[..., None].to(x.dtype) * self.freq)
        for layer in self.layers:
            x = layer(x, pos)
        return x


class PosLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        h = self.fc(self.norm(x) + pos)
        return x + h.view(*x.shape)  # *proxy: symbolic tracing fails, export traces


def test_a_call_whose_sizes_differ_from_the_traced_ones_is_refused() -> None:
    torch.manual_seed(0)
    model = PosNet()
    x = torch.randn(2, 5, 8)
    ids = torch.arange(5).expand(2, -1)
    converted = revcompile.convert(model, {"x": x, "position_ids": ids})
    assert converted.revcompile_plan.stages
    assert "torch.export" in " ".join(converted.revcompile_plan.notes)
    other = torch.randn(3, 5, 8)
    assert converted(other, ids[:1].expand(3, -1)).shape == (3, 5, 8)
    # Position ids of batch 1 beside a batch of 2: the graph reads the batch from
    # one of them; the call is refused by name instead of running on a wrong size.
    with pytest.raises(CallPatternError, match=r"\['position_ids'\] \(dim 0\)"):
        converted(x, ids[:1])
