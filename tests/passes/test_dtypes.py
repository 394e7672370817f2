"""Note [Dtypes that follow the model]: constants of an exported graph under casts and
autocast."""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from revcompile.passes.trace import Traced, trace


class MaskedAttention(nn.Module):
    """Masks its scores with the limit of *their* dtype, as transformers' models do."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        kept = torch.where(mask, scores, torch.finfo(scores.dtype).min)
        return x + (scores + kept).softmax(-1) @ self.v(x)


def _run(gm: fx.GraphModule, traced: Traced, values: list | None = None) -> Tensor:
    """The graph's output: a single tensor, as the module returns it (no out_spec)."""
    assert traced.out_spec is None
    return gm(*(traced.values if values is None else values))


def test_a_mask_limit_follows_the_masked_tensor_under_autocast() -> None:
    """Under bfloat16 autocast the scores are bfloat16 while the model stays float32:
    the traced limit (the model's dtype) must not overflow the scores and must equal
    the eager value, ``finfo(bfloat16).min``."""
    torch.manual_seed(0)
    model = MaskedAttention()
    x = torch.randn(2, 5, 16)
    mask = torch.rand(2, 5, 5) > 0.3
    traced = trace(model, (x, mask), tracer="export")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x, mask)
        got = _run(traced.gm, traced)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
    # Without autocast the limit stays the model's, under a cast too.
    for dtype in (torch.float32, torch.float64, torch.float16):
        gm, eager = traced.gm.to(dtype), model.to(dtype)
        values = [v.to(dtype) if v.is_floating_point() else v for v in traced.values]
        assert torch.equal(_run(gm, traced, values), eager(x.to(dtype), mask))
