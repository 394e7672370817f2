"""The records the passes hand to each other and to the report.

Plain values only: node names (``str``), shapes (``tuple[int, ...]``), enums. Never a
live ``fx.Node``, so a :class:`Plan` can be compared, pickled, printed and turned into
JSON without the graph it was made from. The rewrite pass looks the names up in the
GraphModule that :func:`revcompile.passes.pipeline.plan_model` returns with the plan.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class ReasonKind(enum.Enum):
    """Why a residual block is not converted. Tests assert these, not the wording."""

    PROJECTION_SHORTCUT = "projection shortcut"
    """The skip path computes a strided or 1x1 conv, a pool, a shape change."""
    BRANCH_READS_ACTIVATIONS = "branch reads other activations"
    """The branch reads an activation that does not come from the block's input."""
    BRANCH_VALUE_ESCAPES = "branch value read outside the block"
    """A value computed inside the branch is also used after the block."""
    STREAM_MUTATED_IN_PLACE = "stream mutated in place"
    """An in-place op overwrites the block's input while something still reads it."""
    UNSPLITTABLE_OP = "cannot split the channels"
    """The stream has no channel axis to split in two, or the join changes its dtype."""
    STREAM_ADDED_FIRST = "stream added before the branch sum"
    """``x + a(x) + b(x)``: the branch's value ``a + b`` is no node of the graph."""
    NESTED_IN_BRANCH = "inside a converted block"
    """The block is inside the branch of a block that converts, and converts with it."""
    STAGE_TOO_SHORT = "stage too short"
    """The block's chain has fewer blocks than ``min_blocks``."""
    NOT_CONTRACTIVE = "fixed-point inverse does not converge"
    """``coupling="fixed_point"``: iterating ``x <- y - f(x)`` did not converge on the
    example (Note [Convert only what converges])."""
    BUDGET = "kept by the memory planner"
    """The budget is met without converting the block (it is checkpointed or
    stored, and keeps its function)."""
    REWRITE_FAILED = "rewrite failed"
    """Deriving the stage raised; the detail names the exception."""


class Policy(enum.Enum):
    """What the memory planner does with a block's activations."""

    REVERSIBLE = "reversible"
    """In a reversible stage: rebuilt from the stage's output in backward."""
    CHECKPOINT = "checkpoint"
    """Its input kept, the rest recomputed once in backward (Note [Checkpoint
    exactly once])."""
    STORE = "store"
    """Everything kept, as without revcompile."""


@dataclass(frozen=True)
class Reason:
    """One "no", with a detail naming the module path and op."""

    kind: ReasonKind
    detail: str

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}"


class GlueKind(enum.Enum):
    """What a node between two blocks of a stage (or on an identity skip) does."""

    IDENTITY = "identity"
    """Returns its input: nn.Identity, dropout p=0, a no-op ``.to``/``contiguous``."""
    LAYOUT = "layout"
    """A shape-preserving view, reshape or permute."""
    ACTIVATION = "activation"
    """An elementwise nonlinearity after the join, as in torchvision's ResNets."""
    NORM = "norm"
    """A normalisation after the join (post-norm transformers such as BERT)."""

    @property
    def changes_function(self) -> bool:
        """Whether absorbing this glue into a stage changes what the stage computes."""
        return self in (GlueKind.ACTIVATION, GlueKind.NORM)


@dataclass(frozen=True)
class Glue:
    """A node a stage absorbs between two of its blocks."""

    node: str
    kind: GlueKind
    op: str
    module_path: str


@dataclass(frozen=True)
class ResidualBlock:
    """A residual add ``join = skip(fork) + branch(fork, context)`` and its verdict."""

    join: str
    """The add node."""
    fork: str
    """The stream value entering the block (read by the skip and by the branch)."""
    skip: tuple[str, ...]
    """Skip-path nodes, fork to join: identity glue, or a projection's shortcut."""
    branch: tuple[str, ...]
    """Nodes on the paths from the fork to the join, but the skip, in graph order."""
    context: tuple[str, ...]
    """Tensors the branch reads that do not depend on the stream: masks, tables."""
    module_path: str
    shape: tuple[int, ...]
    """Shape of the stream at the fork, for the example inputs."""
    dtype: str
    channel_dim: int
    """Index of the channel axis: 1 for NCHW convolutions, else the last one."""
    channels: int
    stochastic: tuple[str, ...]
    """Dropout, drop-path and random ops inside the block, replayed by the runtime."""
    join_in_place: bool
    """The add writes into one of its operands (``+=``, ``add_``)."""
    bytes_stored: int
    """Activation bytes the original stores for this block (Note [Activation bytes])."""
    output_bytes: int
    """Bytes of the join's output, the one value a stage ending here still stores."""
    reason: Reason | None = None
    stage: int | None = None
    """Index of the stage that converts this block, when it converts."""
    scope: str = ""
    """Path of the submodule traced to find the block (Note [Keep the user's model]);
    node names (`join`, `fork`, ...) are names in that submodule's graph."""
    policy: Policy = Policy.STORE
    """What the memory planner chose (passes/planner.py)."""
    saved_bytes: int = 0
    """Bytes the original saves for the block's backward on the example, measured
    (Note [Measured activation bytes]); 0 where the planner did not measure."""
    predicted_bytes: int = 0
    """Bytes it keeps under its policy (for a stage: its share of the output)."""
    recompute_flops: int = 0
    """Forward FLOPs its policy recomputes in backward."""

    @property
    def eligible(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class Stage:
    """A maximal chain of eligible blocks that becomes one reversible stage."""

    index: int
    blocks: tuple[str, ...]
    """Join node names in order."""
    input: str
    """The first block's fork."""
    output: str
    """The last block's join."""
    glue: tuple[Glue, ...]
    """Nodes between consecutive blocks that the stage absorbs."""
    channel_dim: int
    channels: int
    split: tuple[int, int]
    """Channels of the two halves ``(x1, x2)``: ``(C // 2, C - C // 2)``."""
    context: tuple[str, ...]
    shape_reads: tuple[str, ...]
    """Nodes reading only the shape of a value inside the stage (the input shape)."""
    function_changes: tuple[str, ...]
    """Why the converted stage computes a different function, one entry per cause."""
    bytes_before: int
    """Activation bytes the original stores for the stage's blocks and glue."""
    bytes_after: int
    """What the reversible stage stores: its output."""
    context_bytes: int
    """Bytes of the context, stored the same before and after, so left out of both."""
    scope: str = ""
    """Path of the submodule whose graph holds the stage, which the rewrite replaces."""

    @property
    def uneven(self) -> bool:
        return self.split[0] != self.split[1]

    @property
    def changes_function(self) -> bool:
        return bool(self.function_changes)


@dataclass(frozen=True)
class Scope:
    """A submodule traced on its own because it encloses stages (or is the model)."""

    path: str
    """Its path in the model, "" for the model itself."""
    module: str
    """Its class name."""
    tracer: str
    """``"fx"`` or ``"export"``."""
    stages: int
    """How many stages its rewrite builds."""


@dataclass(frozen=True)
class Plan:
    """Which residual blocks convert, in which stages, and why the others do not."""

    tracer: str
    """``"fx"`` (symbolic tracing) or ``"export"`` (``torch.export``, non-strict)."""
    training: bool
    """The mode the model was in, and traced in."""
    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    """``(placeholder name, shape)`` of each tensor input used for the shapes."""
    blocks: tuple[ResidualBlock, ...]
    """Every residual add of the model, in graph order."""
    stages: tuple[Stage, ...]
    activation_bytes: int
    """Activation bytes the whole model stores (Note [Activation bytes])."""
    min_blocks: int
    notes: tuple[str, ...] = ()
    """What the tracer specialised or changed, in words."""
    scopes: tuple[Scope, ...] = ()
    """The submodules traced and rewritten on their own, in model order."""
    budget: int | None = None
    """The activation-memory budget in bytes at the example, None for none."""
    original_bytes: int = 0
    """Activation bytes the original saves for backward on the example, measured."""
    predicted_bytes: int = 0
    """Activation bytes the converted model is predicted to save, on the example."""

    @property
    def bytes_saved(self) -> int:
        return sum(s.bytes_before - s.bytes_after for s in self.stages)

    @property
    def fraction_saved(self) -> float:
        """Measured and predicted by the planner where it ran, else from shapes."""
        if self.original_bytes:
            return 1.0 - self.predicted_bytes / self.original_bytes
        return (
            self.bytes_saved / self.activation_bytes if self.activation_bytes else 0.0
        )

    @property
    def converted(self) -> tuple[ResidualBlock, ...]:
        return tuple(b for b in self.blocks if b.eligible)

    def summary(self) -> str:
        """One honest line: what converts, the memory saved, what is kept and why."""
        if not self.blocks:
            return "no residual blocks found; nothing converts"
        kept = [b.reason for b in self.blocks if b.reason is not None]
        s = "" if len(self.stages) == 1 else "s"
        line = (
            f"{len(self.converted)} of {len(self.blocks)} residual blocks "
            f"in {len(self.stages)} stage{s} convert; "
            f"about {self.fraction_saved:.0%} of activation memory no longer stored"
        )
        checkpointed = sum(b.policy is Policy.CHECKPOINT for b in self.blocks)
        if kept:
            counts: dict[str, int] = {}
            for reason in kept:
                counts[reason.kind.value] = counts.get(reason.kind.value, 0) + 1
            why = ", ".join(
                k if len(counts) == 1 else f"{n} {k}" for k, n in counts.items()
            )
            line += f"; {len(kept)} block{'' if len(kept) == 1 else 's'} kept: {why}"
        if checkpointed:
            line += f" ({checkpointed} checkpointed)"
        return line

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON data, as ``revcompile report --json`` prints."""
        return {
            "tracer": self.tracer,
            "training": self.training,
            "inputs": {name: list(shape) for name, shape in self.inputs},
            "blocks": [_block_dict(b) for b in self.blocks],
            "stages": [_stage_dict(s) for s in self.stages],
            "activation_bytes": self.activation_bytes,
            "bytes_saved": self.bytes_saved,
            "fraction_saved": self.fraction_saved,
            "min_blocks": self.min_blocks,
            "budget": self.budget,
            "original_bytes": self.original_bytes,
            "predicted_bytes": self.predicted_bytes,
            "notes": list(self.notes),
            "scopes": [
                {
                    "path": c.path,
                    "module": c.module,
                    "tracer": c.tracer,
                    "stages": c.stages,
                }
                for c in self.scopes
            ],
            "summary": self.summary(),
        }


def _reason_dict(reason: Reason | None) -> dict[str, str] | None:
    if reason is None:
        return None
    return {
        "kind": reason.kind.name,
        "text": reason.kind.value,
        "detail": reason.detail,
    }


def _block_dict(b: ResidualBlock) -> dict[str, Any]:
    return {
        "join": b.join,
        "fork": b.fork,
        "module_path": b.module_path,
        "eligible": b.eligible,
        "reason": _reason_dict(b.reason),
        "stage": b.stage,
        "scope": b.scope,
        "policy": b.policy.value,
        "saved_bytes": b.saved_bytes,
        "predicted_bytes": b.predicted_bytes,
        "recompute_flops": b.recompute_flops,
        "shape": list(b.shape),
        "dtype": b.dtype,
        "channel_dim": b.channel_dim,
        "channels": b.channels,
        "skip": list(b.skip),
        "branch_ops": len(b.branch),
        "context": list(b.context),
        "stochastic": list(b.stochastic),
        "bytes_stored": b.bytes_stored,
    }


def _stage_dict(s: Stage) -> dict[str, Any]:
    return {
        "index": s.index,
        "scope": s.scope,
        "blocks": len(s.blocks),
        "joins": list(s.blocks),
        "input": s.input,
        "output": s.output,
        "channel_dim": s.channel_dim,
        "channels": s.channels,
        "split": list(s.split),
        "uneven": s.uneven,
        "glue": [{"node": g.node, "kind": g.kind.value, "op": g.op} for g in s.glue],
        "context": list(s.context),
        "changes_function": s.changes_function,
        "function_changes": list(s.function_changes),
        "bytes_before": s.bytes_before,
        "bytes_after": s.bytes_after,
    }
