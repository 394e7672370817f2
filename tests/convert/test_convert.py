"""revcompile.convert on small models: the converted model is an ordinary module."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import revcompile
from tests.helpers import rel_err
from tests.models import NanoGPT, PreActResNet

F64 = torch.float64


def _stages(m: nn.Module) -> list[revcompile.ReversibleStage]:
    return [s for s in m.modules() if isinstance(s, revcompile.ReversibleStage)]


@pytest.fixture
def resnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return PreActResNet(depth=2).double(), torch.randn(2, 3, 8, 8, dtype=F64)


def test_user_model_untouched_and_plan_attached(resnet) -> None:
    model, x = resnet
    before = copy.deepcopy(model.state_dict())
    out_before = model.eval()(x)
    model.train()
    converted = revcompile.convert(model, (x,))
    assert model.training and all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )
    assert torch.equal(model.eval()(x), out_before)
    plan = converted.revcompile_plan
    assert [len(s.couplings) for s in _stages(converted)] == [2, 2]
    assert [len(s.blocks) for s in plan.stages] == [2, 2]
    assert "ReversibleStage" in repr(converted)


def test_convert_agrees_with_analyze(resnet) -> None:
    model, x = resnet
    plan = revcompile.analyze(model, (x,))
    converted = revcompile.convert(model, (x,))
    assert plan.to_dict()["stages"] == converted.revcompile_plan.to_dict()["stages"]


def test_state_dict_round_trip_into_a_fresh_conversion(resnet) -> None:
    model, x = resnet
    a = revcompile.convert(model, (x,))
    for p in a.parameters():  # move away from the warm start
        p.data.add_(0.01)
    b = revcompile.convert(model, (x,))
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))


def test_save_load_deepcopy_to_and_modes(resnet) -> None:
    model, x = resnet
    converted = revcompile.convert(model, (x,)).eval()
    buf = io.BytesIO()
    torch.save(converted, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(converted)
    assert torch.equal(loaded(x), converted(x)) and torch.equal(clone(x), converted(x))
    assert loaded.revcompile_plan == converted.revcompile_plan
    as_f32 = copy.deepcopy(converted).to(torch.float32)
    assert as_f32(x.float()).dtype == torch.float32
    # train() puts batch norm back on batch statistics: outputs change.
    assert not torch.equal(converted.train()(x), converted.eval()(x))


def test_eval_switches_dropout_off_in_a_converted_transformer() -> None:
    torch.manual_seed(0)
    model = NanoGPT(layers=2, dropout=0.5)
    idx = torch.randint(0, 64, (2, 12))
    converted = revcompile.convert(model, (idx,))
    assert len(_stages(converted)) == 1
    converted.eval()
    assert torch.equal(converted(idx), converted(idx))
    converted.train()
    assert not torch.equal(converted(idx), converted(idx))


def test_other_input_shapes_after_conversion() -> None:
    model = NanoGPT(layers=1)
    converted = revcompile.convert(model, (torch.randint(0, 64, (2, 12)),))
    for b, t in [(1, 5), (3, 20)]:
        assert converted(torch.randint(0, 64, (b, t))).shape == (b, t, 64)


def test_gradients_match_storing_mode(resnet) -> None:
    model, x = resnet
    converted = revcompile.convert(model, (x,))
    xs = x.clone().requires_grad_(True)
    converted(xs).square().sum().backward()
    grads = [p.grad.clone() for p in converted.parameters()]
    dx = xs.grad.clone()
    converted.zero_grad()
    xs.grad = None
    with revcompile.storing_activations():
        converted(xs).square().sum().backward()
    assert rel_err(dx, xs.grad) < 1e-10
    for g, p in zip(grads, converted.parameters(), strict=True):
        assert rel_err(g, p.grad) < 1e-10


def test_nothing_to_convert_warns_or_raises() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    with pytest.raises(revcompile.ConversionError, match="revcompile report"):
        revcompile.convert(mlp, (x,), strict=True)
    with pytest.warns(UserWarning, match="nothing converts"):
        converted = revcompile.convert(mlp, (x,))
    assert torch.equal(converted(x), mlp(x))


def test_unknown_coupling_is_refused(resnet) -> None:
    model, x = resnet
    with pytest.raises(ValueError, match="coupling='affine' is not supported"):
        revcompile.convert(model, (x,), coupling="affine")


def test_fine_tune_after_conversion_keeps_lowering_the_loss() -> None:
    """Train a little, convert, train on: the loss goes on falling."""
    torch.manual_seed(0)
    model = PreActResNet(depth=2, width=8)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))

    def train(m: nn.Module, steps: int) -> list[float]:
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for _ in range(steps):
            loss = nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    before = train(model, 15)
    converted = revcompile.convert(model, (x,))
    after = train(converted, 30)
    assert before[-1] < before[0]
    assert after[-1] < after[0] and after[-1] < before[-1]


def test_converting_a_plain_resnet_does_not_warn(resnet) -> None:
    model, x = resnet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        revcompile.convert(model, (x,))
