"""Dominators and post-dominators over a data-flow graph: the one module using networkx.

It knows nothing of fx: vertices are node names, edges are "value flows from a to b".
The analysis decides which edges are data flow (shape reads are not) and asks:

- ``dominates(a, b)``: every path from the sources to ``b`` passes through ``a``;
- ``post_dominates(a, b)``: every path from ``b`` to the sink passes through ``a``.

Both answer in O(1) from DFS intervals over the dominator trees, so checking every
node of every branch stays linear in the graph size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import networkx as nx

_SOURCE = "__revcompile_source__"


class DominatorTree:
    """Immediate dominators of a DAG from one root, with constant-time queries."""

    def __init__(self, graph: nx.DiGraph, root: str) -> None:
        self.idom: dict[str, str] = nx.immediate_dominators(graph, root)
        children: dict[str, list[str]] = {}
        for node, parent in self.idom.items():
            if node != parent:
                children.setdefault(parent, []).append(node)
        self._enter: dict[str, int] = {}
        self._leave: dict[str, int] = {}
        clock, stack = 0, [(root, False)]
        while stack:  # iterative DFS: dominator trees of deep models are deep
            node, done = stack.pop()
            if done:
                self._leave[node] = clock
                continue
            self._enter[node] = clock
            clock += 1
            stack.append((node, True))
            stack.extend((c, False) for c in children.get(node, ()))

    def dominates(self, a: str, b: str) -> bool:
        """True when ``a`` dominates ``b`` (every node dominates itself)."""
        if a not in self._enter or b not in self._enter:
            return False
        return self._enter[a] <= self._enter[b] and self._leave[b] <= self._leave[a]

    def parent(self, node: str) -> str | None:
        parent = self.idom.get(node)
        return None if parent is None or parent == node else parent


class FlowGraph:
    """A data-flow DAG with its dominator and post-dominator trees.

    Args:
        nodes: vertex names in topological order.
        edges: ``(producer, consumer)`` pairs.
        sink: the vertex every live value flows to (the graph's output).
    """

    def __init__(
        self, nodes: Sequence[str], edges: Iterable[tuple[str, str]], sink: str
    ) -> None:
        self.graph = nx.DiGraph()
        self.graph.add_nodes_from(nodes)
        self.graph.add_edges_from(edges)
        self.order = {n: i for i, n in enumerate(nodes)}
        # Live: values that reach the sink. Dead ends (unused tuple elements, asserts)
        # are not data flow and would otherwise look like escapes from a block.
        self.live = frozenset(nx.ancestors(self.graph, sink) | {sink})
        reverse = self.graph.subgraph(self.live).reverse(copy=True)
        self._post = DominatorTree(reverse, sink)

    def preds(self, node: str) -> list[str]:
        return list(self.graph.predecessors(node))

    def succs(self, node: str) -> list[str]:
        return [s for s in self.graph.successors(node) if s in self.live]

    def ancestors(self, node: str) -> set[str]:
        return nx.ancestors(self.graph, node)

    def descendants(self, node: str) -> set[str]:
        return nx.descendants(self.graph, node) & self.live

    def post_dominates(self, a: str, b: str) -> bool:
        return self._post.dominates(a, b)

    def dominator_tree(self, among: Iterable[str]) -> DominatorTree:
        """Dominators of the subgraph induced by ``among``, from a virtual source that
        feeds every vertex with no predecessor inside it."""
        sub = nx.DiGraph(self.graph.subgraph(among))
        sub.add_node(_SOURCE)
        sub.add_edges_from(
            (_SOURCE, n)
            for n in list(sub.nodes)
            if n != _SOURCE and sub.in_degree(n) == 0
        )
        return DominatorTree(sub, _SOURCE)

    @staticmethod
    def is_source(node: str | None) -> bool:
        return node == _SOURCE
