"""Measure the scopes, run the planner, and re-plan the scopes by its choice.

See Note [Planning under a budget] in planner.py and Note [Measured activation
bytes] in saved.py. Eligible blocks the planner does not make reversible get a
BUDGET reason, so the chains form again around them; every block records its policy,
the bytes it keeps and the FLOPs it recomputes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import fx

from revcompile.passes import ops
from revcompile.passes.dataflow import dataflow
from revcompile.passes.extract import prelude
from revcompile.passes.flops import flops
from revcompile.passes.ir import Policy, Reason, ReasonKind, ResidualBlock, Stage
from revcompile.passes.meta import output_bytes
from revcompile.passes.options import Options
from revcompile.passes.plan import make_plan
from revcompile.passes.planner import (
    Choice,
    Key,
    Unit,
    choose,
    next_unit,
    unit_bytes,
)
from revcompile.passes.saved import Ledger, measure_model, record_scope
from revcompile.passes.scopes import ScopeTrace, Search
from revcompile.passes.spans import checkpointable, trailing_glue
from revcompile.runtime.couplings import FAMILIES


@dataclasses.dataclass(frozen=True)
class Budgeted:
    scopes: list[ScopeTrace]
    original: int  # bytes the whole original saves, measured
    predicted: int
    budget: int | None
    notes: list[str]


@dataclasses.dataclass(frozen=True)
class _Block:
    """What a unit's policy touches in its scope's graph."""

    scope: str
    block: ResidualBlock
    after: tuple[str, ...]  # glue after the join, to the next block or trailing
    overwritten: bool  # an in-place op writes the join's value


def plan_budget(
    found: Search, model: Any, inputs: tuple[tuple, dict], options: Options
) -> Budgeted:
    """The scopes re-planned under ``options.memory_budget``."""
    whole = measure_model(model, *inputs, {s.path: s.module for s in found.scopes})
    ledger = Ledger()
    units: list[Unit] = []
    parts: dict[Key, _Block] = {}
    chain = 0
    for scope in found.scopes:
        gm = scope.traced.gm
        record_scope(ledger, scope.path, gm, scope.traced.values, whole)
        nodes = {n.name: n for n in gm.graph.nodes}
        stage_of = {j: s for s in scope.plan.stages for j in s.blocks}
        blocks = {x.join: x for x in scope.plan.blocks}
        for b in scope.plan.blocks:
            if b.join not in stage_of and not checkpointable(b, nodes):
                continue
            after = _after(b, stage_of, blocks, nodes, gm)
            key = (scope.path, b.join)
            names = [*b.branch, *b.skip, b.join, *after]
            units.append(
                Unit(
                    key=key,
                    chain=chain + stage_of[b.join].index
                    if b.join in stage_of
                    else None,
                    checkpointable=checkpointable(b, nodes),
                    stored=_charged(ledger, scope.path, names),
                    checkpointed=output_bytes(nodes[b.fork]),
                    output=output_bytes(nodes[b.join]),
                    flops=flops([*b.branch, *b.skip], gm),
                    within=tuple(
                        (scope.path, o.join)
                        for o in scope.plan.blocks
                        if o.join != b.join and b.join in (*o.branch, *o.skip)
                    ),
                )
            )
            overwritten = any(
                ops.mutated_input(u, gm) is nodes[b.join] for u in nodes[b.join].users
            )
            parts[key] = _Block(scope.path, b, after, overwritten)
        chain += len(scope.plan.stages)
    fixed = whole.total - sum(ledger.sizes.values())
    streams = 1 if FAMILIES[options.coupling].splits else 2

    def total_of(policies: dict[Key, Policy]) -> int:
        return fixed + _predict(ledger, units, parts, policies, streams)

    budget = _bytes(options.memory_budget, whole.total)
    choice = choose(units, total_of, budget)
    kept = unit_bytes(units, choice.policies, streams)
    scopes = [_replan(s, choice, units, kept, options) for s in found.scopes]
    notes = []
    if not choice.reached and budget is not None:
        notes.append(
            f"memory_budget of {budget} bytes is below what any plan reaches; the "
            f"plan with the least memory keeps {choice.predicted} bytes"
        )
    return Budgeted(scopes, whole.total, choice.predicted, budget, notes)


def _after(
    b: ResidualBlock,
    stage_of: dict[str, Stage],
    blocks: dict[str, ResidualBlock],
    nodes: dict[str, fx.Node],
    gm: fx.GraphModule,
) -> tuple[str, ...]:
    """Glue after the join: to the next block of its stage, or trailing glue a
    checkpoint takes in."""
    stage = stage_of.get(b.join)
    if stage is None or b.join == stage.blocks[-1]:
        return tuple(trailing_glue(b, nodes, gm))
    nxt = blocks[stage.blocks[stage.blocks.index(b.join) + 1]]
    return tuple(n.name for n in prelude(nodes[b.join], nodes[nxt.fork], stage))


def _charged(ledger: Ledger, path: str, names: list[str]) -> int:
    """Bytes of the tensors these nodes save (for ordering the planner's moves)."""
    mine = {f"{path}:{n}" for n in names}
    return sum(
        size
        for value, size in ledger.sizes.items()
        if ledger.savers.get(value, set()) & mine
    )


def _predict(
    ledger: Ledger,
    units: list[Unit],
    parts: dict[Key, _Block],
    policies: dict[Key, Policy],
    streams: int,
) -> int:
    removed: set[str] = set()
    added: list[str] = []
    fresh: list[tuple[str, set[str]]] = []
    extra = 0
    for i, u in enumerate(units):
        policy = policies[u.key]
        if policy is Policy.STORE:
            continue
        part = parts[u.key]
        b, path = part.block, part.scope
        nxt = next_unit(units, i, policies)
        in_run = (
            policy is Policy.REVERSIBLE
            and nxt is not None
            and nxt.chain == u.chain
            and policies[nxt.key] is Policy.REVERSIBLE
        )
        inside = [*b.branch, *b.skip, b.join]
        if policy is Policy.CHECKPOINT or in_run:
            inside.extend(part.after)
        removed.update(f"{path}:{n}" for n in inside)
        if policy is Policy.CHECKPOINT:
            added.append(ledger.made_by.get(f"{path}:{b.fork}", ""))
        elif not in_run:  # the run's last block: the stage keeps its output
            value = ledger.made_by.get(f"{path}:{b.join}", "")
            added.append(value)
            extra += (streams - 1) * u.output
            if part.overwritten:
                fresh.append((value, set(ledger.savers.get(value, set()))))
    return ledger.predict(removed, added, fresh) + extra


def _bytes(budget: float | int | None, original: int) -> int | None:
    if budget is None:
        return None
    return int(budget * original) if isinstance(budget, float) else budget


def _replan(
    scope: ScopeTrace,
    choice: Choice,
    units: list[Unit],
    kept: dict[Key, int],
    options: Options,
) -> ScopeTrace:
    mine = {u.key[1]: u for u in units if u.key[0] == scope.path}
    blocks = []
    for b in scope.plan.blocks:
        policy = choice.policies.get((scope.path, b.join), Policy.STORE)
        if b.eligible and policy is not Policy.REVERSIBLE:
            what = "checkpointed" if policy is Policy.CHECKPOINT else "stored"
            b = dataclasses.replace(
                b,
                reason=Reason(
                    ReasonKind.BUDGET,
                    f"{what}: the memory budget holds without converting "
                    f"{b.module_path or '(top level)'}",
                ),
            )
        blocks.append(b)
    df = dataflow(scope.traced.gm)
    plan = make_plan(scope.traced, tuple(blocks), options, df)
    annotated = tuple(
        _annotated(b, choice, mine, kept, scope.path) for b in plan.blocks
    )
    plan = dataclasses.replace(plan, blocks=annotated, notes=scope.plan.notes)
    return dataclasses.replace(scope, plan=plan)


def _annotated(
    b: ResidualBlock,
    choice: Choice,
    units: dict[str, Unit],
    kept: dict[Key, int],
    path: str,
) -> ResidualBlock:
    unit = units.get(b.join)
    if unit is None:
        return b
    policy = choice.policies[(path, b.join)]
    return dataclasses.replace(
        b,
        policy=policy,
        saved_bytes=unit.stored,
        predicted_bytes=kept[(path, b.join)],
        recompute_flops=0 if policy is Policy.STORE else unit.flops,
    )
