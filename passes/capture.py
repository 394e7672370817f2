"""Real values of chosen graph nodes for the example inputs, leaving no trace.

The channel split checks each derived F and G by running it on the activations the
block really sees; fake-tensor shapes are not enough for that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree


@contextlib.contextmanager
def untouched(module: nn.Module, inputs: Any = ()) -> Iterator[None]:
    """Run `module` under no_grad as often as needed, leaving no trace: its buffers
    (batch-norm statistics, counters) and the global RNG (CUDA's too, for the devices
    of `inputs`) are as before. A train-mode probe would otherwise move pretrained
    running statistics at every conversion."""
    buffers = {k: b.clone() for k, b in module.named_buffers()}
    leaves = pytree.tree_leaves(inputs)
    devices = sorted({t.get_device() for t in leaves if _is_cuda(t)})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for k, b in module.named_buffers():
                if k in buffers:
                    b.copy_(buffers[k])


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
    recorder = _Recorder(gm, set(names))
    with untouched(gm, inputs):
        recorder.run(*inputs)
    return recorder.values


def _is_cuda(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_cuda
