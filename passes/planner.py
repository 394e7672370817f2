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
   keeps less checkpointed is checkpointed (today's meaning, plus the kept blocks),
   but for the block the model ends in: backward starts there, so recomputing it
   saves nothing at the peak (`_last_stored`);
2. with one, it starts from storing everything; while over, it checkpoints the unit
   that frees the most bytes per FLOP, then turns whole chains reversible (most
   bytes first), giving back the chain's last blocks while the budget still holds;
3. then it stores again every checkpointed unit the budget does not need, cheapest
   savings first, so no FLOP is recomputed for memory that is not needed.

A kept block inside the branch of another unit (EfficientViM's ``h * act(z) + h * D``
inside its mixer's residual) is covered by that unit once it is reversible or
checkpointed: its nodes become the outer unit's F, G or span, so it has no policy of
its own and keeps nothing (`within`, `_uncovered`).

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
    within: tuple[Key, ...] = ()  # the blocks whose branch holds this one's join


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
        policies = _last_stored(units, _uncovered(units, policies))
        return Choice(policies, total_of(policies), True)
    policies = {u.key: Policy.STORE for u in units}

    def total() -> int:
        return total_of(_uncovered(units, policies))

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
    policies = _uncovered(units, policies)
    predicted = total_of(policies)
    return Choice(policies, predicted, predicted <= budget)


def _last_stored(units: list[Unit], policies: dict[Key, Policy]) -> dict[Key, Policy]:
    """Store the block the model ends in rather than checkpoint it: backward starts
    with it, so its recompute comes back at once, at the same peak, for no saving (and
    the user's head, which such a block may hold, stays the module they replace)."""
    if not units or policies[units[-1].key] is not Policy.CHECKPOINT:
        return policies
    return {**policies, units[-1].key: Policy.STORE}


def covered(u: Unit, policies: dict[Key, Policy]) -> bool:
    """Whether `u`, a kept block, lies inside a unit that is reversible or
    checkpointed (and takes it in)."""
    return u.chain is None and any(
        policies.get(k, Policy.STORE) is not Policy.STORE for k in u.within
    )


def next_unit(units: list[Unit], i: int, policies: dict[Key, Policy]) -> Unit | None:
    """The unit after `units[i]`, passing over the covered ones (blocks inside the
    next block's branch come before its join)."""
    return next((u for u in units[i + 1 :] if not covered(u, policies)), None)


def _uncovered(units: list[Unit], policies: dict[Key, Policy]) -> dict[Key, Policy]:
    """`policies` with every covered unit stored: it has no span of its own left to
    checkpoint or convert (its nodes are the enclosing unit's)."""
    return {
        u.key: Policy.STORE if covered(u, policies) else policies[u.key] for u in units
    }


def unit_bytes(
    units: list[Unit], policies: dict[Key, Policy], streams: int
) -> dict[Key, int]:
    """What each unit keeps for backward under `policies`; a reversible run's
    output is charged to its last block."""
    kept: dict[Key, int] = {}
    for i, u in enumerate(units):
        policy = policies[u.key]
        if covered(u, policies):
            kept[u.key] = 0  # the enclosing unit's bytes
        elif policy is Policy.STORE:
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
            nxt = next_unit(units, i, policies)
            ends = (
                nxt is None
                or nxt.chain != u.chain
                or policies[nxt.key] is not Policy.REVERSIBLE
            )
            # A run keeps its output, unless what reads it keeps it anyway.
            own = (streams - 1 if u.output_saved else streams) * u.output
            kept[u.key] = own if ends else 0
    return kept
