"""Keeping revcompile's graphs loadable: the tracer that unpickling re-traces with.

Note [Unpickling re-traces]
``torch.load`` rebuilds a GraphModule by symbolically tracing its generated code
with the tracer class recorded in ``_tracer_cls``. Helper functions of the runtime
(`pad_channels`, ...) do Python arithmetic on shapes, which fails on a Proxy, so they
must stay opaque calls: `RuntimeTracer` auto-wraps them wherever the generated code
refers to them. Every GraphModule revcompile builds is marked with it.
"""

from __future__ import annotations

from torch import fx

from revcompile.runtime.branches import (
    fill_limit,
    finfo_limit,
    full_size,
    narrow_channels,
    pad_channels,
)

LEAF_FUNCTIONS = (pad_channels, narrow_channels, full_size, finfo_limit, fill_limit)


class RuntimeTracer(fx.Tracer):
    """fx's tracer with the runtime's helper functions kept whole, and buffers read
    as buffers: fx's default would bake a buffer's value at load time into a
    constant (a batch-norm statistic that export's graph updates, a position index)."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=LEAF_FUNCTIONS)
        self.proxy_buffer_attributes = True


def loadable(gm: fx.GraphModule) -> fx.GraphModule:
    """Mark `gm` to be re-traced with `RuntimeTracer` on unpickling."""
    gm._tracer_cls = RuntimeTracer
    gm.graph._tracer_cls = RuntimeTracer
    return gm
