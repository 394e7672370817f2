"""Run in a fresh process: peak RSS growth of one forward+backward of a stage of
`N` pre-activation conv blocks of one family (float32, 8 x 32 x 32 x 32 input).

Usage: python -m tests.runtime.peak_family FAMILY N (reversible|storing) [guard]
Prints the bytes by which the process's peak RSS grew during the step. Run with
MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import revcompile
from revcompile.runtime.couplings import FAMILIES
from tests.runtime.families import PreActConv, Scaled
from tests.runtime.peak_rss import peak_rss_bytes, rss_bytes

CHANNELS = 32


def conv_stage(name: str, n: int, guard: bool | None = None) -> nn.Module:
    """`n` blocks of `name`: full width 32 channels, or F and G on 16 + 16."""
    family = FAMILIES[name]
    half = CHANNELS // 2
    if family.splits:
        units = [
            (PreActConv(half, half, half), PreActConv(half, half, half))
            for _ in range(n)
        ]
    else:
        units = [PreActConv(CHANNELS, CHANNELS, CHANNELS) for _ in range(n)]
        if name == "fixed_point":
            units = [Scaled(u, 0.2) for u in units]
    return revcompile.ReversibleStage(family.build(units), guard=guard)


def main() -> None:
    name, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    guard = True if len(sys.argv) > 4 and sys.argv[4] == "guard" else None
    torch.manual_seed(0)
    torch.set_num_threads(1)
    stage = conv_stage(name, n, guard)
    # Load kernels and thread pools on a tiny input first: their one-off memory is not
    # activation memory, and the tiny step leaves the peak near the baseline.
    stage(torch.randn(2, CHANNELS, 4, 4, requires_grad=True)).sum().backward()
    stage.zero_grad(set_to_none=True)
    x = torch.randn(8, CHANNELS, 32, 32, requires_grad=True)  # 1 MiB
    before = rss_bytes()
    if mode == "storing":
        with revcompile.storing_activations():
            stage(x).sum().backward()
    else:
        stage(x).sum().backward()
    print(peak_rss_bytes() - before)


if __name__ == "__main__":
    main()
