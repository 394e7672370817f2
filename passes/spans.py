"""Which kept blocks a checkpoint can wrap: a block from its fork to its join.

A checkpoint (Note [Checkpoint exactly once]) replaces a block's span, the branch, the
shortcut and the join, by one call that keeps only the span's input. That is sound
where the span reads nothing but its fork and context, and nothing inside it is read
after the join; the blocks kept for such reasons qualify, where their fork is one
tensor (a block forked off ``torch.split``'s tuple, EfficientViM's
``h * act(z) + h * D``, has no one input to keep). Blocks kept because their
branch reads other activations, leaks a value or mutates the stream do not.
"""

from __future__ import annotations

from torch import fx

from revcompile.passes import ops
from revcompile.passes.ir import GlueKind, ReasonKind, ResidualBlock
from revcompile.passes.meta import tensor_info

CHECKPOINTABLE = {
    None,  # eligible blocks the planner does not convert
    ReasonKind.PROJECTION_SHORTCUT,
    ReasonKind.STAGE_TOO_SHORT,
    ReasonKind.NOT_CONTRACTIVE,
    ReasonKind.UNSPLITTABLE_OP,
    ReasonKind.BUDGET,
    ReasonKind.REWRITE_FAILED,
}


def checkpointable(block: ResidualBlock, nodes: dict[str, fx.Node]) -> bool:
    """Whether `block`'s span can be one checkpoint."""
    if (block.reason.kind if block.reason else None) not in CHECKPOINTABLE:
        return False
    if tensor_info(nodes[block.fork]) is None:
        return False
    inside = {*block.branch, *block.skip, block.join}
    for name in inside - {block.join}:
        for user in nodes[name].users:
            if user.name not in inside:
                return False
    return block.fork not in inside


def trailing_glue(
    block: ResidualBlock, nodes: dict[str, fx.Node], gm: fx.GraphModule
) -> list[str]:
    """Elementwise glue right after the join (torchvision's post-join ReLU), which a
    checkpoint takes in: it would save its output, the next block's input."""
    found: list[str] = []
    node = nodes[block.join]
    while len(node.users) == 1:
        (user,) = node.users
        kind = ops.glue_kind(user, gm)
        if kind not in (GlueKind.ACTIVATION, GlueKind.IDENTITY):
            break
        if user.all_input_nodes != [node]:
            break
        found.append(user.name)
        node = user
    return found
