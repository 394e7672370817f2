"""Data flow of a traced graph: which values flow where, and which are activations.

Note [Activations and context]
An *activation* is a value computed from the model's inputs that needs a gradient: it
depends on an input through data flow and on a parameter (or on a floating-point
input). The residual stream and everything a branch computes from it are activations.
A value a branch reads that is *not* an activation is context: an attention mask
(from an integer input, no parameter), a rotary table (from a buffer), a relative
position bias (a parameter, but no input). Context is the same whichever block reads
it, so a reversible stage can take it as an extra input. An activation from somewhere
else (a U-Net's encoder feature, an earlier block's intermediate) is not context: the
block is then no function of its input alone. Shape reads (``x.shape``, ``x.size()``,
``zeros_like``) are not data flow at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from revcompile.passes import ops
from revcompile.passes.graph import DominatorTree, FlowGraph
from revcompile.passes.meta import is_float_tensor


@dataclass(frozen=True)
class DataFlow:
    gm: fx.GraphModule
    nodes: dict[str, fx.Node]
    flow: FlowGraph
    activations: frozenset[str]
    param_derived: frozenset[str]
    """Values computed from parameters alone (a parameter itself, a layer scale)."""
    act_tree: DominatorTree
    """Dominators among activations: ``a`` dominates ``b`` when every way the inputs
    reach ``b`` passes through ``a``."""

    def node(self, name: str) -> fx.Node:
        return self.nodes[name]

    def users(self, name: str) -> list[str]:
        """Live data-flow readers of a value."""
        return self.flow.succs(name)

    def order(self, name: str) -> int:
        return self.flow.order[name]


def alias_root(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """The value whose storage ``node`` shares: back through views, no-op ``.to`` and
    in-place ops (whose result is their mutated input)."""
    while node.args and isinstance(node.args[0], fx.Node):
        if not (ops.may_alias(node) or ops.mutated_input(node, gm) is not None):
            break
        node = node.args[0]
    return node


def aliases(root: fx.Node, gm: fx.GraphModule) -> set[fx.Node]:
    """Every node that may share ``root``'s storage (``root`` included)."""
    found, todo = {root}, [root]
    while todo:
        for user in todo.pop().users:
            if user in found or not user.args or user.args[0] not in found:
                continue
            if ops.may_alias(user) or ops.mutated_input(user, gm) is not None:
                found.add(user)
                todo.append(user)
    return found


def dataflow(gm: fx.GraphModule) -> DataFlow:
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    edges = []
    for node in gm.graph.nodes:
        if not ops.is_shape_read(node):
            edges.extend((a.name, node.name) for a in node.all_input_nodes)
        written = ops.mutated_input(node, gm)
        if written is not None:
            # An in-place op overwrites a value: a node after it that reads an older
            # name of that storage reads what this op wrote. Add the hidden edge.
            for alias in aliases(alias_root(written, gm), gm):
                if order[alias] < order[node]:
                    edges.extend(
                        (node.name, u.name)
                        for u in alias.users
                        if order[u] > order[node] and not ops.is_shape_read(u)
                    )
    sink = next(n.name for n in reversed(gm.graph.nodes) if n.op == "output")
    flow = FlowGraph(list(nodes), edges, sink)

    data: dict[str, bool] = {}
    grad: dict[str, bool] = {}
    for node in gm.graph.nodes:
        preds = flow.preds(node.name)
        floating = is_float_tensor(node)
        data[node.name] = node.op == "placeholder" or any(data[p] for p in preds)
        grad[node.name] = floating and (
            node.op == "placeholder"
            or ops.is_parameter(node, gm)
            or ops.has_parameters(node, gm)
            or any(grad[p] for p in preds)
        )
    live = flow.live
    acts = frozenset(n for n in nodes if n in live and data[n] and grad[n])
    derived = frozenset(n for n in nodes if grad[n] and not data[n])
    return DataFlow(gm, nodes, flow, acts, derived, flow.dominator_tree(acts))
