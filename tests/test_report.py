"""The report renders a plan: one row per residual add, stages, one honest total."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
from rich.console import Console
from torch import nn

import revcompile
from revcompile.report import format_bytes, render


def text_of(renderable: object) -> str:
    console = Console(file=io.StringIO(), record=True, width=100, color_system=None)
    console.print(renderable)
    return console.export_text()


@pytest.fixture(scope="module")
def resnet18_plan() -> revcompile.Plan:
    return revcompile.analyze(torchvision.models.resnet18())


def test_rows_reasons_stages_and_total(resnet18_plan: revcompile.Plan) -> None:
    text = text_of(render(resnet18_plan))
    for path in ("layer1.0", "layer1.1", "layer2.0", "layer4.1"):
        assert path in text
    assert text.count("converts") == 5 and text.count("projection shortcut") >= 3
    assert "layer2.0.downsample.0" in text  # the kept block's detail names the op
    assert "32+32 @1" in text
    assert text.count("checkpoint") >= 3 and text.count("reversible") == 5
    assert "post-join" in text and "moved" in text  # ReLU moved into the branch
    assert resnet18_plan.summary() in " ".join(text.split())


def test_a_budget_shows_in_the_report() -> None:
    model = torchvision.models.resnet18()
    plan = revcompile.analyze(model, memory_budget=1.0)
    text = text_of(render(plan))
    assert "store" in text and "reversible" not in text and "budget" in text


def test_the_total_line_is_honest(resnet18_plan: revcompile.Plan) -> None:
    line = resnet18_plan.summary()
    assert line.startswith("5 of 8 residual blocks in 4 stages convert; about ")
    assert line.endswith(
        "% of activation memory no longer stored; 3 blocks kept: projection shortcut "
        "(3 checkpointed)"
    )
    measured = 1 - resnet18_plan.predicted_bytes / resnet18_plan.original_bytes
    assert f"about {measured:.0%}" in line


def test_a_plan_with_nothing_to_convert_renders() -> None:
    plan = revcompile.analyze(nn.Conv2d(3, 3, 1), (torch.randn(1, 3, 4, 4),))
    assert "no residual blocks found" in text_of(render(plan))


def test_notes_are_shown() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    plan = revcompile.analyze(model, (torch.randn(2, 4),), tracer="export")
    assert "note: torch.export kept the input sizes dynamic" in " ".join(
        text_of(render(plan)).split()
    )


@pytest.mark.parametrize(
    ("n", "text"),
    [(512, "512 B"), (1536, "1.5 KiB"), (3 << 20, "3.0 MiB"), (5 << 30, "5.0 GiB")],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text
