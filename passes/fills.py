"""Find the padding masks a call may leave out (`Fill`), by trying it on the example.

A converted submodule replays the call it was traced on (Note [One call pattern per
graph]): traced with an ``attention_mask``, it would refuse a call without one. Where
the module itself treats ``attention_mask=None`` exactly like a mask of ones shaped
like another argument (``input_ids``), as transformers' models do, the converted
module may fill in the ones. That is checked, never assumed: the module runs on the
example both ways (same seed, no grad, buffers put back) and must give equal outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from revcompile.runtime.calls import Fill, tensor_leaves
from revcompile.runtime.scope import call_arguments


def find_fills(module: nn.Module, arguments: dict[str, Any]) -> tuple[Fill, ...]:
    """The `Fill`s that hold for `module` on the call given by `arguments`."""
    fills = []
    for name, value in arguments.items():
        if not isinstance(value, Tensor) or value.is_floating_point():
            continue
        like = next(
            (
                other
                for other, v in arguments.items()
                if other != name and isinstance(v, Tensor) and v.shape == value.shape
            ),
            None,
        )
        if like is None:
            continue
        without = {**arguments, name: None}
        ones = {**arguments, name: torch.ones_like(value)}
        if _same(_run(module, without), _run(module, ones)):
            fills.append(Fill(name, like, value.dtype))
    return tuple(fills)


def _run(module: nn.Module, arguments: dict[str, Any]) -> list[Tensor] | None:
    args, kwargs = call_arguments(module, arguments)
    buffers = {k: b.clone() for k, b in module.named_buffers()}
    try:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            return tensor_leaves(module(*args, **kwargs))
    except Exception:  # the module needs the argument: no fill
        return None
    finally:
        with torch.no_grad():
            for k, b in module.named_buffers():
                b.copy_(buffers[k])


def _same(a: list[Tensor] | None, b: list[Tensor] | None) -> bool:
    if a is None or b is None or len(a) != len(b) or not a:
        return False
    return all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True)
    )
