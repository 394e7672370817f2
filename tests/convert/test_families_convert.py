"""Every coupling family through `convert`: float64 gradients equal storing mode on a
pre-activation ResNet with batch norm and an uneven channel count, a pre-norm decoder
with dropout and a causal mask, and an encoder with a padding mask; batch-norm
statistics as storing mode's; fixed_point keeps the model's function."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

import revcompile
from revcompile.passes.ir import ReasonKind
from tests.models import NanoGPT, PreActResNet

F64 = torch.float64
FAMILIES = list(revcompile.FAMILIES)


class Encoder(nn.Module):
    """Post-norm encoder layers (BERT-like) reading a key padding mask."""

    def __init__(self, d: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.attn = nn.ModuleList(
            nn.MultiheadAttention(d, 2, batch_first=True) for _ in range(layers)
        )
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(2 * layers))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            for _ in range(layers)
        )

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        h = self.embed(x)
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp, strict=True)):
            h = self.ln[2 * i](h + attn(h, h, h, key_padding_mask=pad)[0])
            h = self.ln[2 * i + 1](h + 0.1 * mlp(h))
        return h


def _models() -> dict[str, tuple[nn.Module, tuple]]:
    torch.manual_seed(0)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, -2:] = True
    return {
        "preact": (PreActResNet(depth=3, width=7), (torch.randn(2, 3, 8, 8),)),
        "decoder": (
            NanoGPT(layers=2, d=16, dropout=0.1),
            (torch.randint(0, 64, (2, 9)),),
        ),
        "encoder": (Encoder(), (torch.randn(2, 5, 6), pad)),
    }


def _step(model: nn.Module, inputs: tuple, storing: bool) -> tuple:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout draws in both modes
    if storing:
        with revcompile.storing_activations():
            out = model(*inputs)
    else:
        out = model(*inputs)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weight).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["preact", "decoder", "encoder"])
def test_family_matches_storing_mode(family: str, name: str) -> None:
    model, inputs = _models()[name]
    model = model.double()
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fixed_point may decline every block
        converted = revcompile.convert(model, inputs, coupling=family)
    stages = [
        m for m in converted.modules() if isinstance(m, revcompile.ReversibleStage)
    ]
    if family == "fixed_point" and not stages:
        kinds = {b.reason.kind for b in converted.revcompile_plan.blocks if b.reason}
        assert ReasonKind.NOT_CONTRACTIVE in kinds
        return
    assert stages and all(s.kind.family == family for s in stages)
    rev, ref = converted, copy.deepcopy(converted)
    out_r, grads_r = _step(rev, inputs, storing=False)
    out_s, grads_s = _step(ref, inputs, storing=True)
    rtol = 1e-6 if family == "fixed_point" else 1e-10
    scale = max(g.abs().max().item() for g in grads_s.values())
    assert (out_r - out_s).abs().max() <= rtol * out_s.abs().max()
    assert grads_r.keys() == grads_s.keys()
    for n, g in grads_s.items():
        floor = max(g.abs().max().item(), 1e-6 * scale)
        assert (grads_r[n] - g).abs().max().item() <= rtol * floor, n
    for (n, a), (_, b) in zip(rev.named_buffers(), ref.named_buffers(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=n)
        else:
            assert torch.equal(a, b), n


@pytest.mark.parametrize("name", ["decoder", "encoder"])
def test_fixed_point_keeps_the_function_and_its_gradients(name: str) -> None:
    """float32: training gradients of the converted blocks equal the original
    model's own (1e-4: the solver's float32 tolerance), eval output equal."""
    model, inputs = _models()[name]
    converted = revcompile.convert(model, inputs, coupling="fixed_point")
    plan = converted.revcompile_plan
    assert plan.stages and not any(s.changes_function for s in plan.stages)
    model.eval(), converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(*inputs), model(*inputs))
    model.train(), converted.train()
    _, grads_o = _step(model, inputs, storing=False)
    _, grads_c = _step(converted, inputs, storing=False)
    kept = grads_o.keys() & grads_c.keys()
    assert kept  # embeddings and heads keep their names
    for n in kept:
        scale = grads_o[n].abs().max().clamp_min(1e-6)
        assert (grads_c[n] - grads_o[n]).abs().max() <= 1e-4 * scale, n


def test_fixup_converts_every_eligible_block() -> None:
    model, inputs = _models()["preact"]
    plain = revcompile.analyze(model, inputs, coupling="fixed_point")
    fixup = revcompile.convert(model, inputs, coupling="fixed_point", init="fixup")
    eligible = revcompile.analyze(model, inputs).converted
    assert len(fixup.revcompile_plan.converted) == len(eligible)
    assert len(plain.converted) <= len(eligible)
    fixup(*inputs).sum().backward()


def test_family_options_are_checked() -> None:
    model, inputs = _models()["preact"]
    with pytest.raises(revcompile.ConversionError, match="choose one of"):
        revcompile.convert(model, inputs, coupling="affine")
    with pytest.raises(revcompile.ConversionError, match="gamma"):
        revcompile.convert(
            model, inputs, coupling="momentum", coupling_options={"g": 1}
        )
    converted = revcompile.convert(
        model, inputs, coupling="momentum", coupling_options={"gamma": 0.5}
    )
    stage = next(
        m for m in converted.modules() if isinstance(m, revcompile.ReversibleStage)
    )
    assert all(abs(float(c.gamma) - 0.5) < 1e-12 for c in stage.couplings)
