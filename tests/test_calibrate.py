"""`calibrate`: each converted stage is fitted to the original stage it replaced."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import revcompile
from revcompile.calibrate import Calibration, calibrate
from tests.models import NanoGPT, PreActResNet


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).sum() / b.pow(2).sum()).item()


def _trained_statistics(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Batch-norm running statistics of the data, as a trained model has."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a plain average over the batches
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()


def _in_stage(model: nn.Module, name: str) -> bool:
    """Whether the parameter or buffer `name` belongs to a reversible stage."""
    stages = [
        p for p, m in model.named_modules() if isinstance(m, revcompile.ReversibleStage)
    ]
    return any(name.startswith(p + ".") for p in stages)


def test_fits_every_stage_and_brings_the_output_closer() -> None:
    torch.manual_seed(0)
    model = PreActResNet(depth=2, width=8)
    batches = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    _trained_statistics(model, batches)
    reference = copy.deepcopy(model.state_dict())
    converted = revcompile.convert(model, (batches[0][:2],)).eval()
    outside = {
        n: p.detach().clone()
        for n, p in converted.named_parameters()
        if not _in_stage(converted, n)
    }
    x = batches[0]
    with torch.no_grad():
        before = _rel(converted(x), model(x))

    report = calibrate(converted, model, batches, steps=40, lr=3e-3)

    assert isinstance(report, Calibration)
    assert [s.module for s in report.stages] == [
        b.module_name for b in converted.revcompile_builds
    ]
    assert all(s.after < s.before and not s.undone for s in report.stages), report
    with torch.no_grad():
        assert _rel(converted(x), model(x)) < 0.5 * before
    assert "2 stages fitted on 3 batches" in report.summary()
    # Only the stages changed; the original is untouched; the modes are restored.
    for n, p in converted.named_parameters():
        if n in outside:
            assert torch.equal(p, outside[n]), n
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert not any(m.training for m in converted.modules())


def test_zero_steps_only_recomputes_batch_norm_statistics() -> None:
    torch.manual_seed(0)
    model = PreActResNet(depth=1, width=8)
    batches = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    _trained_statistics(model, batches)
    converted = revcompile.convert(model, (batches[0][:2],)).train()
    weights = {n: p.detach().clone() for n, p in converted.named_parameters()}
    stats = {n: b.clone() for n, b in converted.named_buffers() if "running" in n}
    report = calibrate(converted, model, batches, steps=0)
    assert not any(s.undone for s in report.stages), report
    assert all(torch.equal(p, weights[n]) for n, p in converted.named_parameters())
    changed = [
        n
        for n, b in converted.named_buffers()
        if n in stats and _in_stage(converted, n) and not torch.equal(b, stats[n])
    ]
    assert changed
    assert all(m.training for m in converted.modules())  # the mode it was in


def test_a_fit_that_makes_a_stage_worse_is_undone() -> None:
    torch.manual_seed(0)
    model = PreActResNet(depth=1, width=8).eval()  # running statistics: 0 and 1
    x = torch.randn(8, 3, 8, 8) * 3 + 2  # ... which do not describe these inputs
    converted = revcompile.convert(model, (x[:2],)).eval()
    report = calibrate(converted, model, [x], steps=0)
    assert all(s.after <= s.before for s in report.stages)
    assert any(s.undone for s in report.stages)
    assert "undone" in report.summary()


def test_transformer_stage_with_context() -> None:
    torch.manual_seed(0)
    model = NanoGPT(layers=2, d=32, heads=4, dropout=0.1).eval()
    batches = [torch.randint(0, 64, (4, 16)) for _ in range(2)]
    converted = revcompile.convert(model, (batches[0][:2],))
    report = calibrate(converted, model, batches, steps=20)
    assert len(report.stages) == 1
    assert report.stages[0].after < report.stages[0].before


@pytest.mark.slow  # two torch.export traces: convert's and calibrate's
def test_exported_model_with_keyword_inputs() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.BertModel(config).eval()
    batches = [
        {
            "input_ids": torch.randint(0, 64, (4, n)),
            "attention_mask": torch.ones(4, n, dtype=torch.long),
        }
        for n in (12, 9)  # another sequence length than the example's
    ]
    converted = revcompile.convert(model, batches[0])
    assert converted.revcompile_plan.tracer == "export"
    report = calibrate(converted, model, batches, steps=20)
    assert report.stages[0].after < report.stages[0].before


def test_refuses_what_it_cannot_calibrate() -> None:
    model = PreActResNet(depth=1, width=8).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(revcompile.ConversionError, match=r"revcompile\.convert"):
        calibrate(model, model, [x])  # type: ignore[arg-type]
    converted = revcompile.convert(model, (x,))
    with pytest.raises(revcompile.ConversionError, match="at least one batch"):
        calibrate(converted, model, [])
    with pytest.raises(revcompile.ConversionError, match="does not trace into"):
        calibrate(converted, PreActResNet(depth=2, width=8), [x])
