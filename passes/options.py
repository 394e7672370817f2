"""The analysis options: one frozen record, built from the public keyword arguments."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from revcompile.errors import ConversionError
from revcompile.passes.hidden import HIDDEN
from revcompile.runtime.couplings import FAMILIES

LeafSpec = type[nn.Module] | str | nn.Module
"""A leaf module as a class, a dotted path (``"blocks.0.attn"``) or an instance."""

TRACERS = ("auto", "fx", "export")
INITS = ("pretrained", "fixup")


@dataclass(frozen=True)
class Options:
    """How to trace and plan.

    Attributes:
        min_blocks: the fewest blocks a stage may have; shorter chains stay as they are.
        leaf_modules: modules symbolic tracing keeps whole (it does not look inside).
        tracer: ``"auto"`` (fx, falling back to torch.export), ``"fx"`` or ``"export"``.
        coupling: the reversible family (`revcompile.FAMILIES`).
        coupling_options: the family's keyword options, as ``(name, value)`` pairs.
        init: ``"pretrained"`` (branches keep their weights) or ``"fixup"`` (the
            last layer of every branch starts at zero: training from scratch).
    """

    min_blocks: int = 1
    leaf_modules: tuple[LeafSpec, ...] = ()
    tracer: str = "auto"
    coupling: str = "additive"
    coupling_options: tuple[tuple[str, Any], ...] = ()
    init: str = "pretrained"
    guard: bool | None = None
    """Stages also save their input and re-anchor on it (Note [Drift guard]); None:
    the family's default."""
    memory_budget: float | int | None = None
    """Activation memory allowed (Note [Planning under a budget]): a fraction of the
    original's, or bytes at the example's size; None: every eligible block
    reversible and kept blocks checkpointed."""
    hidden: str | float = "auto"
    """How F and G share a branch's hidden width (Note [Hidden width])."""

    @property
    def plans_memory(self) -> bool:
        """Whether anything may change: a budget of 1.0 keeps the original."""
        return self.memory_budget != 1.0

    @property
    def keeps_function(self) -> bool:
        """Whether stages compute their blocks' own function (fixed_point)."""
        return self.coupling == "fixed_point"

    @classmethod
    def make(
        cls,
        *,
        min_blocks: int = 1,
        leaf_modules: Iterable[LeafSpec] = (),
        tracer: str = "auto",
        coupling: str = "additive",
        coupling_options: Mapping[str, Any] | None = None,
        init: str = "pretrained",
        guard: bool | None = None,
        memory_budget: float | int | None = None,
        hidden: str | float = "auto",
    ) -> Options:
        if isinstance(min_blocks, bool) or not isinstance(min_blocks, int):
            raise ConversionError(f"min_blocks must be an int >= 1, not {min_blocks!r}")
        if min_blocks < 1:
            raise ConversionError(
                f"min_blocks must be >= 1, not {min_blocks}; min_blocks=1 converts "
                f"every chain, min_blocks=2 skips single blocks"
            )
        if tracer not in TRACERS:
            raise ConversionError(f"tracer must be one of {TRACERS}, not {tracer!r}")
        if isinstance(leaf_modules, (str, type, nn.Module)):
            leaf_modules = (leaf_modules,)  # one leaf given bare
        if coupling not in FAMILIES:
            raise ConversionError(
                f"coupling={coupling!r} is not supported; choose one of "
                f"{tuple(FAMILIES)}."
            )
        given = dict(coupling_options or {})
        known = dict(FAMILIES[coupling].options)
        if set(given) - set(known):
            raise ConversionError(
                f"coupling={coupling!r} takes the options {known} (their defaults); "
                f"got unknown {sorted(set(given) - set(known))}."
            )
        _check_budget(memory_budget)
        _check_hidden(hidden)
        if init not in INITS:
            raise ConversionError(f"init must be one of {INITS}, not {init!r}")
        return cls(
            min_blocks,
            tuple(leaf_modules),
            tracer,
            coupling,
            tuple(sorted(given.items())),
            init,
            guard,
            memory_budget,
            hidden,
        )


def _check_budget(budget: float | int | None) -> None:
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise ConversionError(
            f"memory_budget must be a float or an int, not {budget!r}"
        )
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ConversionError(
            f"memory_budget={budget}: a float is a fraction of the original's "
            "activation memory, in (0, 1]; pass bytes as an int"
        )
    if isinstance(budget, int) and budget <= 0:
        raise ConversionError(f"memory_budget={budget} bytes must be positive")


def _check_hidden(hidden: str | float) -> None:
    if isinstance(hidden, str) and hidden in HIDDEN:
        return
    if isinstance(hidden, float) and 0.5 <= hidden <= 1.0:
        return
    raise ConversionError(
        f"hidden={hidden!r}: one of {HIDDEN}, or the share of each hidden layer's "
        "units F and G keep, a float in [0.5, 1] (Note [Hidden width] in "
        "passes/hidden.py)"
    )
