"""Run in a fresh process: peak memory growth of one training step of a converted
model, reversible or in storing mode.

Usage: python -m tests.convert.peak_convert (preact|gpt) (reversible|storing)
"""

from __future__ import annotations

import sys

import torch

import revcompile
from tests.models import NanoGPT, PreActResNet
from tests.runtime.peak_rss import peak_rss_bytes, rss_bytes


def build(kind: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A model, a tiny warm-up input and the measured input."""
    if kind == "preact":  # two stages of 32 stride-1 blocks
        model = PreActResNet(depth=32, width=32)
        return model, torch.randn(2, 3, 8, 8), torch.randn(8, 3, 32, 32)
    model = NanoGPT(layers=24, d=64, heads=4, vocab=64, block_size=128, dropout=0.0)
    return model, torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (8, 128))


def main() -> None:
    kind, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, tiny, x = build(kind)
    converted = revcompile.convert(model, (tiny,))
    del model
    converted(tiny).float().sum().backward()  # load kernels before measuring
    converted.zero_grad(set_to_none=True)
    before = rss_bytes()
    if mode == "storing":
        with revcompile.storing_activations():
            converted(x).float().sum().backward()
    else:
        converted(x).float().sum().backward()
    print(peak_rss_bytes() - before)


if __name__ == "__main__":
    main()
