"""Activation bytes from shapes: what the original stores, what a stage would store.

Note [Activation bytes]
What autograd keeps for backward is approximated by the ops' outputs: every activation
(Note [Activations and context]) that an op writes to fresh memory counts once at its
full size, for the example inputs. Views and in-place results share their input's
memory and count nothing. Ops that save less (an add saves nothing) or more (batch
norm's statistics, attention's softmax) are not modelled, so the numbers are a guide
to proportions, not a profiler. A reversible stage keeps only its output: each block's
input is rebuilt from its output in backward. Context (masks, tables) is stored the
same before and after and is left out of both sides.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import fx

from revcompile.passes import ops
from revcompile.passes.dataflow import DataFlow
from revcompile.passes.meta import output_bytes


def _fresh(node: fx.Node, df: DataFlow) -> bool:
    """An activation written to new memory by this node."""
    return (
        node.op in ("call_function", "call_method", "call_module")
        and node.name in df.activations
        and not ops.is_view(node)
        and ops.mutated_input(node, df.gm) is None
    )


def stored_bytes(names: Iterable[str], df: DataFlow) -> int:
    """Bytes the original stores for these nodes' outputs."""
    return sum(output_bytes(df.node(n)) for n in names if _fresh(df.node(n), df))


def model_bytes(df: DataFlow) -> int:
    """Bytes the original stores for every activation of the model."""
    return stored_bytes(df.activations, df)


def tensor_bytes(names: Iterable[str], df: DataFlow) -> int:
    """Plain size of some values (context), whether or not they are activations."""
    return sum(output_bytes(df.node(n)) for n in names)
