"""Mixed precision: bf16 autocast at depth, fp16 with GradScaler, the float64 stream."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import revcompile
from tests.helpers import rel_err
from tests.runtime.blocks import conv_stage, mlp_stage


def _grads(stage: nn.Module, x: torch.Tensor, storing: bool) -> list[torch.Tensor]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if storing:
            with revcompile.storing_activations():
                y = stage(x)
        else:
            y = stage(x)
    return list(torch.autograd.grad(y.float().square().sum(), [x, *stage.parameters()]))


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda s: conv_stage(32, c=16), (4, 32, 8, 8)),
        (lambda s: mlp_stage(32, d=32, p=0.0), (4, 16, 64)),
    ],
    ids=["conv", "mlp"],
)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_32_couplings_within_1e_2(make, shape, in_dtype) -> None:
    """The default float64 stream rebuilds exactly, so gradients equal storing mode.
    (A float32 stream gave 18% input-gradient error on the conv stage here.)"""
    torch.manual_seed(0)
    stage = make(None)
    ref = copy.deepcopy(stage)
    x = torch.randn(shape).to(in_dtype).requires_grad_(True)
    got, want = _grads(stage, x, False), _grads(ref, x, True)
    assert (
        max(rel_err(a.float(), b.float()) for a, b in zip(got, want, strict=True))
        < 1e-2
    )
    # The output keeps the input dtype whatever the stream.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stage(x).dtype == in_dtype


def test_bf16_reconstruction_is_exact_with_the_float64_stream() -> None:
    stage = conv_stage(8, c=16)
    x = torch.randn(2, 32, 6, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (r,) = revcompile.check_reconstruction(stage, x)
    assert r.max_abs_error == 0.0


def _fp16_step(model: nn.Module, x: torch.Tensor, scale: float, storing: bool) -> tuple:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    with torch.autocast("cpu", dtype=torch.float16):
        if storing:
            with revcompile.storing_activations():
                loss = model(x).float().square().mean()
        else:
            loss = model(x).float().square().mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return [p.detach().clone() for p in model.parameters()], scaler.get_scale()


@pytest.mark.parametrize("scale", [2.0**8, 2.0**100])
def test_fp16_grad_scaler_steps_and_skips_like_storing_mode(scale: float) -> None:
    """A normal scale steps; an overflowing one yields inf gradients, the step is
    skipped and the scale backs off, exactly as with plain autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), conv_stage(4, c=8))
    ref = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, 3, 8, 8)
    params, new_scale = _fp16_step(model, x, scale, storing=False)
    params_ref, new_scale_ref = _fp16_step(ref, x, scale, storing=True)
    assert new_scale == new_scale_ref
    skipped = all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
    assert skipped == (scale > 2.0**64)
    for a, b in zip(params, params_ref, strict=True):
        assert rel_err(a, b) < 1e-3
