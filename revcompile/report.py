"""A plan as rich renderables. Pure: nothing here prints; ``revcompile.cli`` does."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from revcompile.passes.ir import Plan, ResidualBlock, Stage


def render(plan: Plan) -> RenderableType:
    """The block table, why the kept blocks stay, the stage table, the one-line total
    and the tracer's notes."""
    parts: list[RenderableType] = []
    if plan.blocks:
        parts.append(blocks_table(plan))
    kept = [b for b in plan.blocks if b.reason is not None]
    if kept:
        parts.append(reasons_table(kept))
    if plan.stages:
        parts.append(stages_table(plan))
    if plan.scopes:
        parts.append(scopes_table(plan))
    parts.append(Text(plan.summary(), style="bold"))
    if plan.original_bytes:
        budget = (
            "no budget"
            if plan.budget is None
            else f"budget {format_bytes(plan.budget)}"
        )
        parts.append(
            Text(
                f"activations saved for backward at the example: "
                f"{format_bytes(plan.original_bytes)} -> "
                f"{format_bytes(plan.predicted_bytes)} predicted ({budget})"
            )
        )
    parts.extend(Text(f"note: {n}", style="dim") for n in plan.notes)
    return Group(*parts)


def blocks_table(plan: Plan) -> Table:
    """One row per residual add: where, its stage, and what happens to it; with the
    planner's measurements where it ran (saved: what the original keeps for the
    block's backward; kept: what its policy keeps)."""
    table = Table(title="Residual blocks", title_justify="left")
    table.add_column("module", no_wrap=True)
    measured = plan.original_bytes > 0
    if measured:
        table.add_column("stage", justify="right")
        table.add_column("policy")
        table.add_column("saved", justify="right")
        table.add_column("kept", justify="right")
        table.add_column("recompute FLOPs", justify="right")
    else:
        table.add_column("shape")
        table.add_column("stage", justify="right")
        table.add_column("no longer stored", justify="right")
    table.add_column("verdict")
    last = {(s.scope, s.output) for s in plan.stages}
    for b in plan.blocks:
        verdict = (
            Text("converts", style="green")
            if b.reason is None
            else Text(b.reason.kind.value, style="yellow")
        )
        stage = "-" if b.stage is None else str(b.stage)
        row: list[str | Text] = [b.module_path or "(top level)"]
        if measured:
            row += [
                stage,
                b.policy.value,
                format_bytes(b.saved_bytes),
                format_bytes(b.predicted_bytes),
                _flops(b.recompute_flops),
            ]
        else:
            freed = _freed(b, (b.scope, b.join) in last)
            row += [_shape(b.shape), stage, format_bytes(freed) if b.eligible else "-"]
        table.add_row(*row, verdict)
    return table


def _flops(n: int) -> str:
    if not n:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def reasons_table(kept: list[ResidualBlock]) -> Table:
    """Why each kept block stays as it is, naming the module and op."""
    table = Table(title="Why blocks are kept", title_justify="left")
    table.add_column("module")
    table.add_column("reason")
    for b in kept:
        if b.reason is not None:
            table.add_row(b.module_path or "(top level)", b.reason.detail)
    return table


def stages_table(plan: Plan) -> Table:
    """One row per stage: its blocks, split, context and what the rewrite changes."""
    table = Table(title="Reversible stages", title_justify="left")
    table.add_column("stage", justify="right")
    table.add_column("blocks", justify="right")
    table.add_column("modules")
    table.add_column("split", justify="right")
    table.add_column("context")
    table.add_column("glue")
    table.add_column("stored", justify="right")
    paths = {(b.scope, b.join): b.module_path or "(top level)" for b in plan.blocks}
    for s in plan.stages:
        first, last = paths[s.scope, s.blocks[0]], paths[s.scope, s.blocks[-1]]
        table.add_row(
            str(s.index),
            str(len(s.blocks)),
            first if first == last else f"{first} .. {last}",
            _split(s),
            ", ".join(s.context) or "-",
            _function(s),
            f"{format_bytes(s.bytes_before)} -> {format_bytes(s.bytes_after)}",
        )
    return table


def scopes_table(plan: Plan) -> Table:
    """The submodules that are traced and rewritten; the rest stays eager code."""
    table = Table(title="Rewritten submodules", title_justify="left")
    table.add_column("module")
    table.add_column("class")
    table.add_column("tracer")
    table.add_column("stages", justify="right")
    for c in plan.scopes:
        table.add_row(c.path or "(the model)", c.module, c.tracer, str(c.stages))
    return table


def format_bytes(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ``3.0 MiB``, ``1.2 GiB``."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _freed(b: ResidualBlock, ends_stage: bool) -> int:
    # The last block's output is the stage's output: still stored.
    return b.bytes_stored - (b.output_bytes if ends_stage else 0)


def _function(s: Stage) -> str:
    """What the rewrite moves into the branches (``post-join ReLU moved``), or ``-``.

    Every stage computes a new function (couplings, not residual adds: fine-tune
    after converting); this column is about the glue on top of that.
    """
    moved = dict.fromkeys(
        f"post-join {g.op}" for g in s.glue if g.kind.changes_function
    )
    return f"{', '.join(moved)} moved into branch" if moved else "-"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) or "?"


def _split(s: Stage) -> str:
    text = f"{s.split[0]}+{s.split[1]} @{s.channel_dim}"
    return text + " uneven" if s.uneven else text
