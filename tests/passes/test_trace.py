"""Tracing: shapes and module paths in node.meta, inputs, and the tracer fallback."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from revcompile.passes.meta import module_path, tensor_info
from revcompile.passes.trace import trace


class TwoInputs(nn.Module):
    """Called as model(x=..., mask=...)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x) * mask.unsqueeze(-1)


def test_fx_trace_records_shapes_and_module_paths() -> None:
    traced = trace(torchvision.models.resnet18())
    assert traced.tracer == "fx" and traced.inputs == (("x", (2, 3, 64, 64)),)
    nodes = {n.name: n for n in traced.gm.graph.nodes}
    conv = nodes["layer2_0_conv1"]
    assert module_path(conv) == "layer2.0.conv1"
    info = tensor_info(conv)
    assert info is not None and info.shape == (2, 128, 8, 8)
    assert module_path(nodes["add_2"]) == "layer2.0"  # the block's own forward


def test_keyword_inputs_through_both_tracers() -> None:
    inputs = {"mask": torch.ones(2, 4), "x": torch.randn(2, 4, 8)}
    for tracer in ("fx", "export"):
        traced = trace(TwoInputs(), inputs, tracer=tracer)
        assert dict(traced.inputs) == {"x": (2, 4, 8), "mask": (2, 4)}, tracer


def test_export_output_runs_and_says_what_it_fixed() -> None:
    model = torchvision.models.resnet18().eval()
    traced = trace(model, (torch.randn(2, 3, 32, 32),), tracer="export")
    assert traced.tracer == "export" and not traced.training
    assert any("eval mode" in note for note in traced.notes)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(traced.gm(x), model(x))


def test_caches_are_disabled_where_generate_would_use_one_by_default() -> None:
    # A generation config that leaves use_cache unset (None) means a cache to
    # generate; a config without the attribute gets none added.
    from types import SimpleNamespace

    from revcompile.passes.trace import disable_caches

    class Generating(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace()
            self.generation_config = SimpleNamespace(use_cache=None)

    model = Generating()
    assert disable_caches(model)
    assert model.generation_config.use_cache is False
    assert not hasattr(model.config, "use_cache")
    assert not disable_caches(model)  # nothing left to change
