"""Converted models: activation memory of reversible stages stops growing with depth."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import revcompile
from tests.helpers import saved_bytes
from tests.models import NanoGPT, PreActResNet

ROOT = Path(__file__).resolve().parents[2]


def _peak(kind: str, mode: str) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "tests.convert.peak_convert", kind, mode],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["preact", "gpt"])
def test_converted_peak_memory_at_most_30_percent_of_storing(kind: str) -> None:
    reversible, storing = _peak(kind, "reversible"), _peak(kind, "storing")
    assert storing > 50 * 2**20, storing  # the measurement is of activations
    assert reversible <= 0.30 * storing, (reversible / 2**20, storing / 2**20)


def _saved(model: torch.nn.Module, x: torch.Tensor, storing: bool) -> int:
    converted = revcompile.convert(model, (x,))

    def forward() -> torch.Tensor:
        if storing:
            with revcompile.storing_activations():
                return converted(x).float()
        return converted(x).float()

    return saved_bytes(forward)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: (PreActResNet(depth=n, width=8), torch.randn(2, 3, 8, 8)),
        lambda n: (NanoGPT(layers=n, dropout=0.0), torch.randint(0, 64, (2, 16))),
    ],
    ids=["preact_resnet", "nanogpt"],
)
def test_saved_bytes_flat_in_depth(make) -> None:
    torch.manual_seed(0)
    rev, store = [], []
    for n in (2, 4, 8):
        model, x = make(n)
        rev.append(_saved(model, x, storing=False))
        store.append(_saved(model, x, storing=True))
    assert rev[0] == rev[1] == rev[2]  # stems, heads and stage outputs only
    assert store[0] < store[1] < store[2]
    assert store[2] - store[1] > 0.9 * (store[1] - store[0]) * 2  # linear in depth
