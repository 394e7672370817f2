"""Activation memory of a reversible stage does not grow with its depth."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import revcompile
from tests.helpers import saved_bytes
from tests.runtime.blocks import conv_stage

ROOT = Path(__file__).resolve().parents[2]


def _step_bytes(n: int, storing: bool) -> int:
    torch.manual_seed(0)
    stage = conv_stage(n, c=4)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)

    def forward() -> torch.Tensor:
        if storing:
            with revcompile.storing_activations():
                return stage(x)
        return stage(x)

    return saved_bytes(forward)


def test_saved_bytes_flat_in_depth_while_storing_grows() -> None:
    depths = [4, 8, 16, 32]
    rev = [_step_bytes(n, storing=False) for n in depths]
    store = [_step_bytes(n, storing=True) for n in depths]
    # Only the stage output is saved: 2 * 8 * 8 * 8 float32 = 4 KiB, whatever the depth.
    assert rev == [2 * 8 * 8 * 8 * 4] * len(depths)
    # Storing mode saves every coupling's activations: exactly linear in depth.
    per_coupling = store[0] / depths[0]
    assert store == [per_coupling * n for n in depths]
    assert store[-1] > 100 * rev[-1]


def _peak(n: int, mode: str) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "tests.runtime.peak_rss", str(n), mode],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    return int(out.stdout.strip())


@pytest.mark.slow
def test_peak_process_memory_at_32_couplings_below_15_percent() -> None:
    reversible, storing = _peak(32, "reversible"), _peak(32, "storing")
    # Storing mode keeps ~12 MiB-sized activations per coupling (~400 MiB at N = 32).
    assert storing > 200 * 2**20, storing
    assert reversible < 0.15 * storing, (reversible / 2**20, storing / 2**20)
