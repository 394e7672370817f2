"""The checks a residual block must pass to become a coupling, each giving a Reason.

Each returns None when the block passes, else a Reason whose detail names the module
path and op. ``find_residual_blocks`` applies them in this order and keeps the first
failure, so every block has exactly one verdict.
"""

from __future__ import annotations

from torch import fx

from revcompile.passes import ops
from revcompile.passes.dataflow import DataFlow, alias_root, aliases
from revcompile.passes.ir import Reason, ReasonKind
from revcompile.passes.meta import tensor_info, where


def mutation(
    join: fx.Node, fork: fx.Node, branch: list[str], df: DataFlow
) -> Reason | None:
    """An in-place op on the stream while something still reads the old value."""
    root = alias_root(fork, df.gm)
    for name in branch:
        written = ops.mutated_input(df.node(name), df.gm)
        if written is not None and alias_root(written, df.gm) is root:
            node = df.node(name)
            return Reason(
                ReasonKind.STREAM_MUTATED_IN_PLACE,
                f"{ops.describe(node, df.gm)} at {where(node)} overwrites the block's "
                f"input in place before the skip reads it; make it out-of-place",
            )
    written = ops.mutated_input(join, df.gm)
    if written is None or alias_root(written, df.gm) is not root:
        return None  # `out += identity` writes the branch's output: harmless
    at = df.order(join.name)
    later = [  # readers, after the add, of a name the stream had before it
        u
        for a in aliases(root, df.gm)
        if df.order(a.name) < at
        for u in a.users
        if df.order(u.name) > at and not ops.is_shape_read(u)
    ]
    if root.op != "placeholder" and not later:
        return None  # nobody sees the overwritten value
    seen = "the caller's input"
    if later:
        seen = f"read again by {later[0].name} at {where(later[0])}"
    return Reason(
        ReasonKind.STREAM_MUTATED_IN_PLACE,
        f"in-place add at {where(join)} overwrites the stream {fork.name}, {seen}; "
        f"write `x = x + f(x)` instead of `x += f(x)`",
    )


def shape_change(join: fx.Node, fork: fx.Node) -> Reason | None:
    """The add broadcasts or promotes the stream: no longer ``x + f(x)`` in place."""
    was, now = tensor_info(fork), tensor_info(join)
    if was is None or now is None:
        return Reason(
            ReasonKind.UNSPLITTABLE_OP, f"no shape for the add at {where(join)}"
        )
    if was.shape != now.shape:
        return Reason(
            ReasonKind.PROJECTION_SHORTCUT,
            f"the add at {where(join)} broadcasts the stream {was.shape} -> "
            f"{now.shape}",
        )
    if was.dtype != now.dtype:
        return Reason(
            ReasonKind.UNSPLITTABLE_OP,
            f"the add at {where(join)} promotes the stream from {was.dtype} to "
            f"{now.dtype}; cast the branch output to the stream's dtype",
        )
    return None


def foreign_read(
    fork: fx.Node, join: fx.Node, foreign: tuple, df: DataFlow
) -> Reason | None:
    """The fork must dominate the branch among activations (Note [Activations and
    context]); ``foreign`` lists ``(reader, activation)`` pairs that break it."""
    if df.act_tree.dominates(fork.name, join.name) and not foreign:
        return None
    reader, value = (df.node(n) for n in foreign[0]) if foreign else (join, fork)
    return Reason(
        ReasonKind.BRANCH_READS_ACTIVATIONS,
        f"{ops.describe(reader, df.gm)} at {where(reader)} reads {value.name} from "
        f"{where(value)}, an activation that is not the block's input",
    )


def escape(join: fx.Node, branch: list[str], df: DataFlow) -> Reason | None:
    """The join must post-dominate every branch node: nothing inside is read later."""
    for name in branch:
        if df.flow.post_dominates(join.name, name):
            continue
        node = df.node(name)
        outside = [u for u in df.users(name) if u not in branch and u != join.name]
        user = df.node(outside[0]) if outside else join
        return Reason(
            ReasonKind.BRANCH_VALUE_ESCAPES,
            f"{node.name} computed at {where(node)} is also read by {user.name} at "
            f"{where(user)} (or returned), so it cannot be rebuilt inside the block",
        )
    return None


def sum_order(join: fx.Node, stream: fx.Node) -> Reason:
    """In ``x + a(x) + b(x)`` the branch's value ``a + b`` is never computed."""
    return Reason(
        ReasonKind.STREAM_ADDED_FIRST,
        f"the sum at {where(join)} adds the stream {stream.name} before the branch "
        f"terms are summed, so the branch has no value of its own; write "
        f"`x + (a(x) + b(x))` instead of `x + a(x) + b(x)`",
    )
