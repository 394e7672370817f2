"""CUDA: RNG replay, autocast, a side stream and allocator-measured memory. Skipped
without a CUDA device (tests/conftest.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import revcompile
from tests.helpers import assert_matches_storing, rel_err
from tests.runtime.blocks import conv_stage, mlp_stage

pytestmark = pytest.mark.cuda


def test_cuda_dropout_replay_float64() -> None:
    stage = mlp_stage(4, d=16, p=0.3).double().cuda()
    x = torch.randn(4, 8, 32, dtype=torch.float64, device="cuda", requires_grad=True)
    assert_matches_storing(stage, x, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_32_couplings(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    stage = conv_stage(32, c=16).cuda()
    ref = copy.deepcopy(stage)
    x = torch.randn(8, 32, 16, 16, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        y = stage(x)
        with revcompile.storing_activations():
            y_ref = ref(x)
    (g,) = torch.autograd.grad(y.float().square().sum(), x)
    (g_ref,) = torch.autograd.grad(y_ref.float().square().sum(), x)
    assert rel_err(g, g_ref) < 1e-2


def test_cuda_side_stream() -> None:
    stage = conv_stage(4, c=16).double().cuda()
    x = torch.randn(4, 32, 8, 8, dtype=torch.float64, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        assert_matches_storing(stage, x, rtol=1e-10)
    torch.cuda.current_stream().wait_stream(side)


def test_cuda_peak_memory_flat_in_depth() -> None:
    def peak(n: int, storing: bool) -> int:
        stage = conv_stage(n, c=32).cuda()
        x = torch.randn(16, 64, 32, 32, device="cuda", requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if storing:
            with revcompile.storing_activations():
                stage(x).sum().backward()
        else:
            stage(x).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    rev = [peak(n, False) for n in (4, 16, 32)]
    assert rev[2] < 1.2 * rev[0]
    assert rev[2] < 0.15 * peak(32, True)
