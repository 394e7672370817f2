"""Real values of chosen graph nodes for the example inputs, leaving no trace.

The channel split checks each derived F and G by running it on the activations the
block really sees; fake-tensor shapes are not enough for that.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out
        return out


def capture(
    gm: fx.GraphModule, inputs: list[Any], names: Iterable[str]
) -> dict[str, Any]:
    """Run `gm` once under no_grad and return the values of the nodes in `names`.

    Buffers (batch-norm statistics) and the global RNG are restored afterwards, so the
    converted model starts exactly where the user's model was.
    """
    buffers = {k: b.clone() for k, b in gm.named_buffers()}
    try:
        devices = sorted({t.get_device() for t in inputs if _is_cuda(t)})
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            recorder = _Recorder(gm, set(names))
            recorder.run(*inputs)
    finally:
        with torch.no_grad():
            for k, b in gm.named_buffers():
                b.copy_(buffers[k])
    return recorder.values


def _is_cuda(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_cuda
