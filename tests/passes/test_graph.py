"""The networkx adapter: dominators and post-dominators on a hand-made graph."""

from __future__ import annotations

from revcompile.passes.graph import FlowGraph

#   x -> a -> c -> out        a and b fork from x and join at c;
#   x -> b -> c               d is dead (never reaches out).
#   a -> d
NODES = ["x", "a", "b", "c", "d", "out"]
EDGES = [("x", "a"), ("x", "b"), ("a", "c"), ("b", "c"), ("c", "out"), ("a", "d")]


def test_post_dominators_and_liveness() -> None:
    flow = FlowGraph(NODES, EDGES, "out")
    assert flow.live == {"x", "a", "b", "c", "out"}
    assert flow.post_dominates("c", "a") and flow.post_dominates("c", "x")
    assert not flow.post_dominates("a", "x")
    assert flow.succs("a") == ["c"]  # the dead reader is not data flow


def test_dominators_from_a_virtual_source() -> None:
    flow = FlowGraph(NODES, EDGES, "out")
    tree = flow.dominator_tree(["x", "a", "b", "c", "out"])
    assert tree.dominates("x", "c") and not tree.dominates("a", "c")
    assert tree.parent("c") == "x"
    assert FlowGraph.is_source(tree.parent("x"))
