"""Derive a coupling's F and G from a residual branch (see Note [Slice, don't pad])."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from revcompile.passes.capture import untouched
from revcompile.passes.hidden import Hidden, parameters, share_hidden
from revcompile.passes.restrict import Restriction, restrict
from revcompile.runtime.branches import PaddedBranch


@dataclass(frozen=True)
class HalfBranch:
    """How one of F and G was derived."""

    module: nn.Module
    method: str  # "sliced" or "padded" (the generic fallback)
    detail: str  # boundaries used, or why slicing was abandoned


def split_branch(
    branch: fx.GraphModule,
    example: tuple[Tensor, ...],
    *,
    dim: int,
    sizes: tuple[int, int],
    hidden: Hidden = "auto",
) -> tuple[HalfBranch, HalfBranch]:
    """F (x2 half -> x1 half) and G (x1 half -> x2 half) from `branch`, which maps
    ``(stream, *context)`` to a tensor shaped like the stream. `example` holds real
    inputs for the branch; both halves are checked by running them on it. `hidden`
    shares the hidden width between them (Note [Hidden width] in hidden.py)."""
    c1, c2 = sizes
    channels = c1 + c2
    stream = example[0]
    dim = dim % stream.dim()
    with untouched(branch, example):
        ShapeProp(branch).propagate(*example)
    halves = []
    for in_sel, out_sel in (((c1, channels), (0, c1)), ((0, c1), (c1, channels))):
        halves.append(_derive(branch, example, dim, channels, in_sel, out_sel))
    f, g = halves
    if hidden == "full" or f.method != "sliced" or g.method != "sliced":
        return f, g
    sels = ((c1, channels), (0, c1))  # F reads x2; G reads y1, shaped like x1
    inputs = tuple((stream.narrow(dim, a, b - a), *example[1:]) for a, b in sels)
    try:
        fm, gm, said = share_hidden(
            f.module, g.module, (inputs[0], inputs[1]), hidden, parameters(branch)
        )
    except Exception as e:  # narrowing is a saving, never a reason to fail
        said = f"hidden width whole (narrowing failed: {e})"
        fm, gm = f.module, g.module
    if not said:
        return f, g
    return (
        HalfBranch(fm, f.method, f"{f.detail}; {said}"),
        HalfBranch(gm, g.method, f"{g.detail}; {said}"),
    )


def _derive(
    branch: fx.GraphModule,
    example: tuple[Tensor, ...],
    dim: int,
    channels: int,
    in_sel: tuple[int, int],
    out_sel: tuple[int, int],
) -> HalfBranch:
    half = example[0].narrow(dim, in_sel[0], in_sel[1] - in_sel[0])
    expected = list(example[0].shape)
    expected[dim] = out_sel[1] - out_sel[0]
    try:
        gm, record = restrict(
            branch, dim=dim, channels=channels, in_sel=in_sel, out_sel=out_sel
        )
        with untouched(gm, example):
            out = gm(half, *example[1:])
        if not isinstance(out, Tensor) or list(out.shape) != expected:
            got = getattr(out, "shape", type(out).__name__)
            raise ValueError(f"sliced branch gave {got}, expected {expected}")
        return HalfBranch(gm, "sliced", _describe(record))
    except Exception as e:  # any failure of slicing falls back to the generic form
        padded = PaddedBranch(copy.deepcopy(branch), dim, channels, in_sel[0], out_sel)
        return HalfBranch(padded, "padded", f"slicing failed: {e}")


def _describe(record: Restriction) -> str:
    parts = [f"{len(record.sliced)} layers sliced"]
    if record.padded:
        parts.append(f"zero-padded into {', '.join(record.padded)}")
    if record.narrowed:
        parts.append(f"narrowed after {', '.join(record.narrowed)}")
    if record.degenerate:
        parts.append("a channel-wise path from input to output contributes nothing")
    return "; ".join(parts)
