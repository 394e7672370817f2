"""The reversible families: one file per family, all driven by `ReversibleStage`.

`FAMILIES` maps each ``coupling=`` name to its `Family` record: the coupling class,
whether it splits the stream into channel halves (F and G branches, sliced from a
block) or keeps the full width (each branch a block's own f_k), and `build`, which
turns a stage's branches into its couplings with the family's keyword options:

    >>> from revcompile.runtime.couplings import FAMILIES
    >>> family = FAMILIES["midpoint"]
    >>> couplings = family.build([nn.Linear(8, 8) for _ in range(3)], h=1.0)
    >>> [c.start for c in couplings]
    [True, False, False]
    >>> ReversibleStage(couplings)(torch.randn(2, 8)).shape
    torch.Size([2, 8])

Adding a family is one new file and one entry below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from revcompile.errors import ConversionError
from revcompile.runtime.couplings.additive import AdditiveCoupling as AdditiveCoupling
from revcompile.runtime.couplings.base import Coupling as Coupling
from revcompile.runtime.couplings.base import (
    ReconstructionWarning as ReconstructionWarning,
)
from revcompile.runtime.couplings.fixed_point import (
    FixedPointCoupling as FixedPointCoupling,
)
from revcompile.runtime.couplings.fixed_point import FixedPointProbe as FixedPointProbe
from revcompile.runtime.couplings.fixed_point import (
    probe_fixed_point as probe_fixed_point,
)
from revcompile.runtime.couplings.hamiltonian import (
    HamiltonianCoupling as HamiltonianCoupling,
)
from revcompile.runtime.couplings.leapfrog import LeapfrogCoupling as LeapfrogCoupling
from revcompile.runtime.couplings.midpoint import MidpointCoupling as MidpointCoupling
from revcompile.runtime.couplings.momentum import MomentumCoupling as MomentumCoupling
from revcompile.runtime.couplings.scaled import ScaledCoupling as ScaledCoupling
from revcompile.runtime.couplings.twin import TwinCoupling as TwinCoupling

Build = Callable[[type[Coupling], Sequence[Any], dict[str, Any]], list[Coupling]]


def _per_block(
    cls: type[Coupling], units: Sequence[Any], options: dict[str, Any]
) -> list[Coupling]:
    """One coupling per unit: an (F, G) pair for a splitting family, a branch f (or,
    for fixed_point, an (f, norm) pair) for a full-width one."""
    return [
        cls(*u, **options) if isinstance(u, tuple) else cls(u, **options) for u in units
    ]


def _started(
    cls: type[Coupling], units: Sequence[Any], options: dict[str, Any]
) -> list[Coupling]:
    """One coupling per block; the first is the stage's Euler start."""
    return [cls(f, start=i == 0, **options) for i, f in enumerate(units)]


def _paired(
    cls: type[Coupling], units: Sequence[Any], options: dict[str, Any]
) -> list[Coupling]:
    """Two consecutive blocks per coupling; an odd last block gets no G."""
    fs = list(units)
    return [cls(*fs[i : i + 2], **options) for i in range(0, len(fs), 2)]


@dataclass(frozen=True)
class Family:
    """One ``coupling=`` choice, for the conversion pass to look up."""

    name: str
    coupling: type[Coupling]
    splits: bool  # F and G on channel halves; else full-width branches
    blocks_per_coupling: int
    options: tuple[tuple[str, Any], ...]  # keyword options and their defaults
    reference: str
    make: Build = _per_block

    def build(self, units: Sequence[Any], **options: Any) -> list[Coupling]:
        """The couplings of one stage: `units` are (F, G) pairs for a splitting
        family, else the blocks' branches in order."""
        unknown = set(options) - {name for name, _ in self.options}
        if unknown:
            raise ConversionError(
                f"coupling={self.name!r} takes the options "
                f"{dict(self.options)}; got unknown {sorted(unknown)}."
            )
        if not units:
            raise ConversionError(f"A {self.name} stage needs at least one block.")
        return self.make(self.coupling, units, options)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("additive", AdditiveCoupling, True, 1, (), "RevNet, Gomez et al. 2017"),
        Family(
            "twin", TwinCoupling, False, 2, (), "Reformer, Kitaev et al. 2020", _paired
        ),
        Family(
            "hamiltonian",
            HamiltonianCoupling,
            True,
            1,
            (("h", 1.0),),
            "Chang et al. 2018 (Verlet)",
        ),
        Family(
            "midpoint",
            MidpointCoupling,
            False,
            1,
            (("h", 1.0),),
            "Chang et al. 2018",
            _started,
        ),
        Family(
            "leapfrog",
            LeapfrogCoupling,
            False,
            1,
            (("h", 1.0),),
            "Chang et al. 2018",
            _started,
        ),
        Family(
            "momentum",
            MomentumCoupling,
            False,
            1,
            (("gamma", 0.9), ("exact", True)),
            "Sander et al. 2021 (momentumnet)",
        ),
        Family(
            "scaled",
            ScaledCoupling,
            True,
            1,
            (("l", 0.1), ("b", 1.0), ("exact", True)),
            "MEFT, Liao et al. 2023",
        ),
        Family(
            "fixed_point",
            FixedPointCoupling,
            False,
            1,
            (("tol", None), ("max_iter", 50), ("memory", 5)),
            "RevUp; i-ResNet, Behrmann et al. 2019",
        ),
    )
}
