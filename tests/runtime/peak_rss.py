"""Run in a fresh process: peak RSS growth of one forward+backward of a conv stage.

Usage: python -m tests.runtime.peak_rss N (reversible|storing)
Prints the bytes by which the process's peak RSS grew during the step. Run with
MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS.
"""

from __future__ import annotations

import resource
import sys

import torch

import revcompile
from tests.runtime.blocks import conv_stage


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This address space's high-water mark (VmHWM). Not ru_maxrss: Linux carries
    that across exec from the forked parent, so a subprocess of a big pytest process
    would report the parent's size."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def main() -> None:
    n, mode = int(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    stage = conv_stage(n, c=32)
    # Load kernels and thread pools on a tiny input first: their one-off memory is not
    # activation memory, and the tiny step leaves the peak near the baseline.
    stage(torch.randn(1, 64, 4, 4, requires_grad=True)).sum().backward()
    stage.zero_grad(set_to_none=True)
    x = torch.randn(8, 64, 32, 32, requires_grad=True)  # one half: 1 MiB
    before = rss_bytes()
    if mode == "storing":
        with revcompile.storing_activations():
            stage(x).sum().backward()
    else:
        stage(x).sum().backward()
    print(peak_rss_bytes() - before)


if __name__ == "__main__":
    main()
