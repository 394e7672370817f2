"""Put a rewritten graph into the submodule it was traced from.

The submodule keeps its class, its attributes and every member the graph still reads
(Note [Keep the user's model] in revcompile/runtime/scope.py). Members only the
rewrite has (reversible stages, dropout modules standing in for frozen flags,
constants the tracer computed) are added; members of the replaced blocks, which the
trace read and the rewrite no longer does, are removed, so that no parameter is left
that never gets a gradient (DDP refuses those). Members the trace never read (a
layer the example did not reach) stay as they were.
"""

from __future__ import annotations

from torch import fx, nn

from revcompile.passes.dtypes import REF
from revcompile.passes.trace import Traced
from revcompile.runtime.calls import Fill
from revcompile.runtime.graphs import loadable
from revcompile.runtime.scope import TracedForward, Variant, assign, resolve


def install(
    owner: nn.Module,
    traced: Traced,
    rewritten: fx.GraphModule,
    fills: tuple[Fill, ...] = (),
) -> None:
    """Make `owner` compute `rewritten`, which was made from `traced`, a trace of it;
    `fills` are the arguments a call may leave out (passes/fills.py)."""
    before, after = targets(traced.gm), targets(rewritten)
    used = {p for t in after for p in _prefixes(t)}
    called = {str(n.target) for n in rewritten.graph.nodes if n.op == "call_module"}
    for target in sorted(before - used, key=len):
        if not any(target.startswith(c + ".") for c in called):  # else still in use
            _remove(owner, target, used)
    for target in sorted(after, key=len):
        if resolve(owner, target) is None:
            assign(owner, target, resolve(rewritten, target))
    _reorder(owner, rewritten)
    for m in owner.modules():
        if REF in m._buffers:
            m._non_persistent_buffers_set.add(REF)
    for gm in rewritten.modules():
        if isinstance(gm, fx.GraphModule):
            loadable(gm)
    variant = Variant(traced.pattern, rewritten, traced.out_spec)
    owner.forward = TracedForward(owner, (variant,), traced.path, fills)


def _reorder(owner: nn.Module, rewritten: fx.GraphModule) -> None:
    """Children in the order the graph first uses them, so that ``print(model)`` and
    ``model.modules()`` list a stage where its blocks were; unused children keep
    their place after the child before them."""
    first: dict[str, int] = {}
    for i, node in enumerate(rewritten.graph.nodes):
        if node.op in ("get_attr", "call_module"):
            first.setdefault(str(node.target).split(".")[0], i)
    order, last = [], -1
    for name in owner._modules:
        last = first.get(name, last)
        order.append((last, name))
    order.sort(key=lambda item: item[0])  # stable: ties keep their order
    owner._modules = {name: owner._modules[name] for _, name in order}


def targets(gm: fx.GraphModule) -> set[str]:
    return {
        str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")
    }


def _prefixes(target: str) -> list[str]:
    parts = target.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _remove(owner: nn.Module, target: str, used: set[str]) -> None:
    """Delete `target`, then every module it leaves empty that nothing uses."""
    while target:
        parent_path, _, name = target.rpartition(".")
        parent = resolve(owner, parent_path) if parent_path else owner
        if not isinstance(parent, nn.Module) or not hasattr(parent, name):
            return
        delattr(parent, name)
        if parent_path in used or not _empty(parent):
            return
        target = parent_path


def _empty(m: nn.Module) -> bool:
    members = (*m._modules.values(), *m._parameters.values(), *m._buffers.values())
    return all(v is None for v in members)
