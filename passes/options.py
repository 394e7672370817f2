"""The analysis options: one frozen record, built from the public keyword arguments."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from revcompile.errors import ConversionError

LeafSpec = type[nn.Module] | str | nn.Module
"""A leaf module as a class, a dotted path (``"blocks.0.attn"``) or an instance."""

TRACERS = ("auto", "fx", "export")


@dataclass(frozen=True)
class Options:
    """How to trace and plan.

    Attributes:
        min_blocks: the fewest blocks a stage may have; shorter chains stay as they are.
        leaf_modules: modules symbolic tracing keeps whole (it does not look inside).
        tracer: ``"auto"`` (fx, falling back to torch.export), ``"fx"`` or ``"export"``.
    """

    min_blocks: int = 1
    leaf_modules: tuple[LeafSpec, ...] = ()
    tracer: str = "auto"

    @classmethod
    def make(
        cls,
        *,
        min_blocks: int = 1,
        leaf_modules: Iterable[LeafSpec] = (),
        tracer: str = "auto",
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
        return cls(min_blocks, tuple(leaf_modules), tracer)
