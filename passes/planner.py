"""Choose, per block, reversible, checkpoint or store: the least recompute that fits.

Note [Planning under a budget]
Every block is one unit: an eligible block may be reversible (in a stage), be
checkpointed (its input kept, recomputed once in backward) or be stored; a kept block
(a projection shortcut, a strided block) may be checkpointed or stored. What each
choice keeps for backward is measured on the example (Note [Measured activation
bytes]): a stored block its own saved bytes, a checkpointed one its input, a run of
reversible blocks only the run's output (two streams for the full-width families).
What it costs is the forward FLOPs it recomputes. Only a reversible stage changes the
function (a coupling is not its block), so the planner converts as little as the
budget needs:

1. with no budget, every eligible block is reversible and every kept block that
   keeps less checkpointed is checkpointed (today's meaning, plus the kept blocks);
2. with one, it starts from storing everything; while over, it checkpoints the unit
   that frees the most bytes per FLOP, then turns whole chains reversible (most
   bytes first), giving back the chain's last blocks while the budget still holds;
3. then it stores again every checkpointed unit the budget does not need, cheapest
   savings first, so no FLOP is recomputed for memory that is not needed.

A budget no plan reaches gives the plan with the least memory, and a note.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from revcompile.passes.ir import Policy

Key = tuple[str, str]  # (scope, join)


@dataclass(frozen=True)
class Unit:
    key: Key
    chain: int | None  # the reversible chain it belongs to; None: kept block
    checkpointable: bool
    stored: int  # bytes saved for its backward when stored
    checkpointed: int  # bytes kept when checkpointed: its input
    output: int  # bytes of its output
    flops: int  # forward FLOPs, recomputed by checkpoint or reversible
    after: Key | None = None  # the unit whose output is this one's input, if any
    output_saved: bool = False  # something after it saves its output anyway


@dataclass(frozen=True)
class Choice:
    policies: dict[Key, Policy]
    predicted: int  # activation bytes of the whole model under `policies`
    reached: bool  # the budget holds (or there is none)


Total = Callable[[dict[Key, Policy]], int]  # activation bytes of a whole plan


def choose(units: list[Unit], total_of: Total, budget: int | None) -> Choice:
    """Policies for `units` (in model order); `total_of` predicts a plan's bytes."""
    if budget is None:
        policies = {
            u.key: Policy.REVERSIBLE
            if u.chain is not None
            else Policy.CHECKPOINT
            if u.checkpointable and u.checkpointed < u.stored
            else Policy.STORE
            for u in units
        }
        return Choice(policies, total_of(policies), True)
    policies = {u.key: Policy.STORE for u in units}

    def total() -> int:
        return total_of(policies)

    by_value = sorted(
        (u for u in units if u.checkpointable or u.chain is not None),
        key=lambda u: (u.stored - u.checkpointed) / max(u.flops, 1),
        reverse=True,
    )
    for u in by_value:
        if total() <= budget:
            break
        if u.checkpointed < u.stored:
            policies[u.key] = Policy.CHECKPOINT
    chains: dict[int, list[Unit]] = {}
    for u in units:
        if u.chain is not None:
            chains.setdefault(u.chain, []).append(u)
    for members in sorted(chains.values(), key=lambda m: -sum(u.stored for u in m)):
        if total() <= budget:
            break
        before = {u.key: policies[u.key] for u in members}
        for u in members:
            policies[u.key] = Policy.REVERSIBLE
        for u in reversed(members):  # give back the tail while the budget holds
            policies[u.key] = before[u.key]
            if total() > budget:
                policies[u.key] = Policy.REVERSIBLE
                break
    for u in reversed(by_value):  # cheapest savings first
        if policies[u.key] is Policy.CHECKPOINT:
            policies[u.key] = Policy.STORE
            if total() > budget:
                policies[u.key] = Policy.CHECKPOINT
    predicted = total()
    return Choice(policies, predicted, predicted <= budget)


def unit_bytes(
    units: list[Unit], policies: dict[Key, Policy], streams: int
) -> dict[Key, int]:
    """What each unit keeps for backward under `policies`; a reversible run's
    output is charged to its last block."""
    kept: dict[Key, int] = {}
    for i, u in enumerate(units):
        policy = policies[u.key]
        if policy is Policy.STORE:
            kept[u.key] = u.stored
        elif policy is Policy.CHECKPOINT:
            # The input a reversible run ends in is kept already: one tensor.
            shared = (
                u.after is not None
                and kept.get(u.after, 0) > 0
                and (policies[u.after] is Policy.REVERSIBLE)
            )
            kept[u.key] = 0 if shared else u.checkpointed
        else:
            nxt = units[i + 1] if i + 1 < len(units) else None
            ends = (
                nxt is None
                or nxt.chain != u.chain
                or policies[nxt.key] is not Policy.REVERSIBLE
            )
            # A run keeps its output, unless what reads it keeps it anyway.
            own = (streams - 1 if u.output_saved else streams) * u.output
            kept[u.key] = own if ends else 0
    return kept
