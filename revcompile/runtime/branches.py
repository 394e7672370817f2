"""Building blocks of derived F and G branches.

They live in the runtime, which imports only torch, because converted models call them
and must unpickle without revcompile.passes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn


@fx.wrap
def pad_channels(x: Tensor, axis: int, channels: int, start: int) -> Tensor:
    """Place `x` at channels ``[start, start + n)`` of a zero tensor with `channels`."""
    # (.., n, ..) -> (.., channels, ..); zeros elsewhere, so a linear op that reads the
    # result equals the same op with its input channels sliced.
    n = x.shape[axis]
    before = list(x.shape)
    before[axis] = start
    after = list(x.shape)
    after[axis] = channels - start - n
    parts = [x.new_zeros(before), x, x.new_zeros(after)]
    return torch.cat([p for p in parts if p.shape[axis] > 0], dim=axis)


@fx.wrap
def narrow_channels(x: Tensor, axis: int, start: int, stop: int) -> Tensor:
    """Channels ``[start, stop)`` of `x` along `axis`."""
    return x.narrow(axis, start, stop - start)


class PaddedBranch(nn.Module):
    """The generic F or G: the whole branch on the stream half, the other half zero.

    ``F(x2) = branch(cat(0, x2))[:c1]`` works for any branch, at the cost of the whole
    branch's FLOPs for each of F and G; the channel-split pass uses it only where it
    could not slice (see Note [Slice, don't pad] in passes/restrict.py).
    """

    def __init__(
        self,
        branch: nn.Module,
        axis: int,
        channels: int,
        in_start: int,
        out: tuple[int, int],
    ) -> None:
        super().__init__()
        self.branch = branch
        self.axis, self.channels, self.in_start = axis, channels, in_start
        self.out = out

    def extra_repr(self) -> str:
        return (
            f"axis={self.axis}, channels={self.channels}, "
            f"in_start={self.in_start}, out={self.out}"
        )

    def forward(self, half: Tensor, *context: Any) -> Tensor:
        full = pad_channels(half, self.axis, self.channels, self.in_start)
        return narrow_channels(self.branch(full, *context), self.axis, *self.out)


@fx.wrap
def full_size(x: Tensor, axis: int, channels: int, *dim: int) -> Any:
    """``x.size(*dim)`` as the unsliced branch saw it: `channels` along `axis`.

    A branch written for the whole stream reads its input's size to reshape hidden
    tensors (``B, T, C = x.size()``); its hidden width is kept whole, so it must see
    the whole channel count too.
    """
    shape = list(x.shape)
    shape[axis] = channels
    return torch.Size(shape) if not dim else shape[dim[0]]


@fx.wrap
def finfo_limit(dtype: torch.dtype, which: str) -> float:
    """``torch.finfo(dtype).min`` or ``.max``: a mask value that follows the model's
    dtype (Note [Dtypes that follow the model] in passes/dtypes.py)."""
    return float(getattr(torch.finfo(dtype), which))


@fx.wrap
def fill_limit(target: Tensor, dtype: torch.dtype, which: str) -> float:
    """`finfo_limit` as the fill value of `target`, clipped to `target`'s range.

    Under autocast the model's dtype (float32) and that of the tensor being masked
    (bfloat16 scores) differ; eager code writes ``finfo(scores.dtype).min``, which the
    trace recorded as the model's dtype. Clipping gives the eager value exactly where
    the two dtypes share an exponent range (bfloat16, float32) and the limit of the
    narrower one otherwise, where the eager model would also have used that dtype's.
    """
    value = finfo_limit(dtype, which)
    if not target.is_floating_point():
        return value
    info = torch.finfo(target.dtype)
    return min(max(value, float(info.min)), float(info.max))
