"""Share a branch's hidden width between F and G: the ``hidden=`` option of convert.

Note [Hidden width]
F and G are sliced on the stream's side only (Note [Slice, don't pad] in restrict.py),
so each keeps the branch's whole hidden width. Where a branch's cost sits in the
layers that read and write the stream (a BasicBlock, a transformer MLP, sliced
attention) F+G then cost what the branch cost. Where layers between hidden units
weigh most (a bottleneck's 3x3 conv, an inverted residual's depthwise conv) each
of F and G holds them whole, and F+G cost up to twice the branch: resnet50's
Bottleneck 1.53x, mobilenet_v2's inverted residual 1.21x.

``hidden`` says how many of each hidden layer's units F and G keep:
- ``"full"``: all of them (every pretrained unit in both).
- ``"partition"``: F the first half, G the second: every pretrained unit goes to
  exactly one of them, and F+G cost about half the branch.
- a float ``r`` in [0.5, 1]: F the first ``r`` of the units, G the last ``r``;
  together they hold every unit, the middle ones twice.
- ``"auto"`` (the default): ``"full"`` where F+G cost at most the branch, else the
  largest ``r`` (bisected on parameter counts) at which they do. Full width changes
  nothing for the blocks it already suits, and no converted model grows.

A hidden layer is the output of a dense conv or linear inside F or G whose value
reaches, through element-wise and per-channel ops (norms, activations, depthwise
convs, layer scales, gates), only the inputs of other channel-mixing layers. Its
units are sliced by the walk that slices the stream's channels. A layer whose value
goes anywhere else (reshaped into attention heads, to the output, into an op the walk
does not know) keeps its whole width: narrowing it would need a zero-pad and save
nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, fx
from torch.fx.passes.shape_prop import ShapeProp

from revcompile.passes.capture import untouched
from revcompile.passes.restrict import MIX_FUNCS, Walk
from revcompile.passes.slicing import mixing_channels
from revcompile.passes.split_ops import op_name, shape_of
from revcompile.passes.tidy import drop_unused_attributes, eliminate_dead_code
from revcompile.runtime.branches import full_size, pad_channels

Hidden = str | float
HIDDEN = ("auto", "full", "partition")
_BISECTIONS = 6  # r to within 1/128: finer than one unit of most hidden layers
# Full width is kept up to this much over the branch: F and G each hold the norms
# of the hidden layers whole, a few parameters per unit (a BasicBlock's F+G: 1.0001x).
_SLACK = 1.05
# A zero-pad back to all units, or a size read that would reshape by it: the layer is
# not hidden. (A narrowed operand, a squeeze-excite gate's, is fine.)
_BOUNDARIES = (pad_channels, full_size)


def parameters(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def share_hidden(
    f: fx.GraphModule,
    g: fx.GraphModule,
    examples: tuple[tuple[Tensor, ...], tuple[Tensor, ...]],
    hidden: Hidden,
    budget: int,
) -> tuple[fx.GraphModule, fx.GraphModule, str]:
    """F and G with their hidden layers narrowed as `hidden` says, and what was done
    ("" where they keep it whole as they are).
    `examples` are F's and G's inputs; `budget` is the branch's parameter count, the
    cost ``"auto"`` keeps F+G under."""
    full = parameters(f) + parameters(g)
    if hidden == "full" or (hidden == "auto" and full <= _SLACK * budget):
        return f, g, ""  # nothing to say: as without the option

    def narrowed(keep: float) -> tuple[fx.GraphModule, fx.GraphModule, str]:
        nf, done_f = narrow(f, examples[0], keep, first=True)
        ng, done_g = narrow(g, examples[1], keep, first=False)
        return (
            nf,
            ng,
            f"{done_f} hidden layers of F and {done_g} of G" * (done_f + done_g > 0),
        )

    keep = 0.5 if hidden in ("auto", "partition") else float(hidden)
    nf, ng, done = narrowed(keep)
    if not done:
        return (
            f,
            g,
            (
                "hidden width whole: no hidden layer can be narrowed "
                f"(F+G {full / budget:.2f}x the branch)"
            ),
        )
    if hidden == "auto" and parameters(nf) + parameters(ng) <= budget:
        lo, hi = keep, 1.0  # F+G fit the branch at lo, not at hi
        for _ in range(_BISECTIONS):
            mid = (lo + hi) / 2
            mf, mg, said = narrowed(mid)
            if parameters(mf) + parameters(mg) <= budget:
                lo, nf, ng, done = mid, mf, mg, said
            else:
                hi = mid
        keep = lo
    cost = (parameters(nf) + parameters(ng)) / budget
    return nf, ng, f"{done} keep {keep:.0%} of their units (F+G {cost:.2f}x the branch)"


def narrow(
    half: fx.GraphModule, example: tuple[Tensor, ...], keep: float, *, first: bool
) -> tuple[fx.GraphModule, int]:
    """A copy of `half` whose hidden layers keep a `keep` share of their units, the
    first ones (`first`) or the last ones; and how many layers were narrowed."""
    gm, done = copy.deepcopy(half), 0
    names = [n.name for n in gm.graph.nodes if _mixes(gm, n)]
    for name in names:
        _shapes(gm, example)
        trial = copy.deepcopy(gm)
        if _narrow_one(trial, name, keep, first, example):
            gm, done = trial, done + 1
    return gm, done


def _narrow_one(
    gm: fx.GraphModule, name: str, keep: float, first: bool, example: tuple
) -> bool:
    """Narrow the output of mixing layer `name` and everything it reaches; False
    (and `gm` to be thrown away) where its value is not a hidden layer."""
    node = next(n for n in gm.graph.nodes if n.name == name)
    shape = shape_of(node)
    if not shape:
        return False
    axis = 1 if _is_conv(gm, node) else len(shape) - 1
    units = int(shape[axis])
    k = max(1, round(keep * units))
    if k >= units:
        return False
    sel = (0, k) if first else (units - k, units)
    before = _count(gm, _BOUNDARIES)
    walk = Walk(gm, axis, units, sel, sel, stream=node)
    if not walk.slice_writer(node, axis):
        return False
    written = len(walk.record.sliced)
    walk.forward()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    results = out.args[0] if isinstance(out.args[0], tuple | list) else (out.args[0],)
    readers = len(walk.record.sliced) - written
    if walk.record.padded or not readers or any(r in walk.in_axis for r in results):
        return False
    if _count(gm, _BOUNDARIES) != before:  # a size read of the hidden value
        return False
    eliminate_dead_code(gm)
    gm.delete_all_unused_submodules()
    drop_unused_attributes(gm)
    gm.recompile()
    try:
        with untouched(gm, example):
            want, got = half_shape(gm, example)
    except Exception:  # the narrowed graph does not run: keep the layer whole
        return False
    return want == got


def half_shape(gm: fx.GraphModule, example: tuple) -> tuple[list[int], list[int]]:
    """(the shape `gm`'s output must have: its input's, with the output's channel
    count as traced, and the shape it has now)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    traced = out.args[0]
    traced = traced[0] if isinstance(traced, tuple | list) else traced
    want = list(shape_of(traced) or ())
    got = gm(*example)
    got = got[0] if isinstance(got, tuple | list) else got
    return want, list(got.shape)


def _mixes(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return mixing_channels(gm.get_submodule(str(node.target))) is not None
    return node.op == "call_function" and op_name(node) in MIX_FUNCS


def _is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        mix = mixing_channels(gm.get_submodule(str(node.target)))
        return mix is not None and mix[2] == "first"
    return op_name(node).startswith("conv")


def _count(gm: fx.GraphModule, targets: tuple[Callable, ...]) -> int:
    return sum(n.op == "call_function" and n.target in targets for n in gm.graph.nodes)


def _shapes(gm: fx.GraphModule, example: tuple) -> None:
    with untouched(gm, example):
        ShapeProp(gm).propagate(*example)
