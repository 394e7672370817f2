"""A second call pattern for a converted submodule: ``generate``'s.

Note [Graphs that share one stage]
A graph replays one call pattern (Note [One call pattern per graph] in
revcompile/runtime/calls.py), and transformers' ``generate`` calls a language model's
inner model unlike a training step does (``position_ids`` given, ``use_cache=False``).
So that ``converted.generate`` works, the inner model is traced a second time, on
generate's call, before the first rewrite replaces it, and rewritten the same way.
The second graph may only add to the submodule: every member it reads that the first
already installed (its reversible stages above all) must be the very same, or be
equal to it: same type, same structure and weights, the same generated code in every
graph inside (up to the names of values and the order in which torch.export writes
the operands of size arithmetic, which differs between exports of one model). Then
both graphs train and decode one set of parameters; otherwise the second graph is
dropped, and the plan and a call of its pattern (`refuse_variant`) say why.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.node import map_arg

from revcompile.passes.install import assign, resolve, targets
from revcompile.passes.trace import Traced
from revcompile.runtime.calls import CallPattern
from revcompile.runtime.graphs import loadable
from revcompile.runtime.scope import Refused, TracedForward, Variant


def add_variant(owner: nn.Module, traced: Traced, rewritten: fx.GraphModule) -> str:
    """Let `owner` (converted already) also replay `traced`'s call through
    `rewritten`; returns "" when it does, else why not."""
    forward = owner.forward
    if not isinstance(forward, TracedForward):
        return "the submodule was not converted"
    missing = []
    for target in sorted(targets(rewritten), key=len):
        mine, theirs = resolve(owner, target), resolve(rewritten, target)
        if mine is None:
            missing.append(target)
        elif mine is not resolve(traced.gm, target) and not _same(mine, theirs):
            return f"{target} would differ from the first graph's"
    for target in missing:
        assign(owner, target, resolve(rewritten, target))
    for gm in rewritten.modules():
        if isinstance(gm, fx.GraphModule):
            loadable(gm)
    variant = Variant(traced.pattern, rewritten, traced.out_spec)
    forward.variants = (*forward.variants, variant)
    return ""


def refuse_variant(owner: nn.Module, pattern: CallPattern, why: str) -> None:
    """Remember that a call of `pattern` got no graph, so that such a call is
    refused with `why` and not only with the argument that differs."""
    forward = owner.forward
    if isinstance(forward, TracedForward):
        forward.refused = (*forward.refused, Refused(pattern, why))


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, nn.Module):
        tensors_a, tensors_b = _tensors(a), _tensors(b)
        return (
            _fingerprint(a) == _fingerprint(b)
            and tensors_a.keys() == tensors_b.keys()
            and all(_same(tensors_a[k], tensors_b[k]) for k in tensors_a)
        )
    return a == b


def _tensors(m: nn.Module) -> dict[str, Tensor]:
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


def _fingerprint(m: nn.Module) -> tuple:
    """The module tree and every graph inside it, up to the names of graph values
    (which come from the traced graph's node names and differ between traces) and
    the order of the operands of size arithmetic (`_commutative`)."""
    graphs = tuple(_graph(g) for g in m.modules() if isinstance(g, fx.GraphModule))
    return repr(m), graphs


def _graph(gm: fx.GraphModule) -> tuple:
    index: dict[fx.Node, int] = {}
    shape = []
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        args = map_arg((node.args, node.kwargs), lambda n: index[n])  # type: ignore
        target = None if node.op == "placeholder" else node.target
        text = repr(args)
        if _commutative(node):
            text = repr(sorted(repr(a) for a in args[0]))
        shape.append((node.op, target, text))
    return tuple(shape)


def _commutative(node: fx.Node) -> bool:
    """Whether `node` is arithmetic on sizes whose operands may come in either
    order. torch.export writes a symbolic product or sum (``batch * seq`` of a
    reshape) in sympy's order of its symbols, and numbers the symbols per export:
    two exports of one model on calls with other inputs (``position_ids`` given or
    not) write the same product in either order."""
    if node.op != "call_function" or node.target not in (operator.add, operator.mul):
        return False
    if node.kwargs or len(node.args) != 2:
        return False
    value = node.meta.get("val")
    return isinstance(value, int | float | torch.SymInt | torch.SymFloat)
