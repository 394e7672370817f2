"""The call a traced submodule was traced for, and matching later calls against it.

Note [One call pattern per graph]
A traced graph replays one way of calling a module: which arguments were tensors,
which were None, and the value of every other argument (``use_cache=False``,
``output_attentions=None``) are baked into it. A converted submodule therefore keeps
the pattern of the call it was traced on. Each later call is bound to the module's
own ``forward`` signature (positional or keyword, defaults filled in) and flattened
with pytree; it runs the graph when it has the same structure and the same non-tensor
values, and otherwise fails with the argument that differs, never with a wrong result.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree


class Slot(enum.Enum):
    """Where a tensor goes in a call pattern (an enum member survives pickling)."""

    TENSOR = "tensor"


@dataclass(frozen=True)
class CallPattern:
    """The structure and non-tensor values of one call (Note [One call pattern per
    graph]); the graph's inputs are the call's tensors in pytree order."""

    spec: pytree.TreeSpec
    leaves: tuple[Any, ...]  # Slot.TENSOR where the call had a tensor
    same_sizes: tuple[tuple[tuple[int, int], ...], ...] = ()
    """Groups of ``(tensor, dim)`` the graph takes to be one size (Note [Sizes the
    graph takes to be equal]); on the class too, for patterns pickled before it."""
    bounds: tuple[tuple[tuple[int, int] | None, ...], ...] = ()
    """Per tensor and dim, the sizes ``(low, high)`` the graph holds for (None: any;
    low is kept only where it is high), Note [Sizes an export fixed] in
    passes/export.py; () for a graph of any sizes."""

    @staticmethod
    def of(
        arguments: dict[str, Any],
        same_sizes: tuple[tuple[tuple[int, int], ...], ...] = (),
        bounds: tuple[tuple[tuple[int, int] | None, ...], ...] = (),
    ) -> CallPattern:
        leaves, spec = pytree.tree_flatten(arguments)
        slots = tuple(Slot.TENSOR if isinstance(v, Tensor) else v for v in leaves)
        return CallPattern(spec, slots, same_sizes, bounds)

    @property
    def n_tensors(self) -> int:
        return sum(v is Slot.TENSOR for v in self.leaves)

    def tensors(self, arguments: dict[str, Any]) -> list[Tensor]:
        """The tensors of a call of this pattern (`mismatch` must have said None)."""
        return tensor_leaves(arguments)

    def rebuild(self, tensors: tuple[Tensor, ...]) -> dict[str, Any]:
        """The arguments of the traced call, with `tensors` in the tensor slots."""
        it = iter(tensors)
        leaves = [next(it) if v is Slot.TENSOR else v for v in self.leaves]
        return pytree.tree_unflatten(leaves, self.spec)

    def mismatch(self, arguments: dict[str, Any]) -> str | None:
        """None when a call fits this pattern, else what differs, in words."""
        leaves, spec = pytree.tree_flatten(arguments)
        if spec != self.spec:
            return _structure(self.spec, spec)
        paths = [pytree.keystr(k) for k, _ in pytree.tree_leaves_with_path(arguments)]
        for path, want, got in zip(paths, self.leaves, leaves, strict=True):
            if want is Slot.TENSOR:
                if not isinstance(got, Tensor):
                    return f"{path} was a tensor and is now {_show(got)}"
            elif isinstance(got, Tensor):
                return f"{path} was {_show(want)} and is now a tensor"
            elif not _same(want, got):
                return f"{path} was {_show(want)} and is now {_show(got)}"
        return self._sizes_differ(paths, leaves) or self._out_of_bounds(paths, leaves)

    def _out_of_bounds(self, paths: list[str], leaves: list[Any]) -> str | None:
        tensors = [
            (p, v) for p, v in zip(paths, leaves, strict=True) if isinstance(v, Tensor)
        ]
        for (path, got), sizes in zip(tensors, self.bounds, strict=False):
            for dim, (bound, size) in enumerate(zip(sizes, got.shape, strict=False)):
                if bound is None or bound[0] <= size <= bound[1]:
                    continue
                low, high = bound
                if low < high and size < low:
                    continue  # export puts dynamic sizes at 2 or more: 1 runs
                held = f"{high}" if low == high else f"sizes up to {high}"
                return (
                    f"{path} has size {size} on dim {dim}, and torch.export fixed "
                    f"the graph to {held} there (the model branches on it): "
                    f"convert with an example of this size (Note [Sizes an export "
                    f"fixed] in passes/export.py)"
                )
        return None

    def _sizes_differ(self, paths: list[str], leaves: list[Any]) -> str | None:
        """Note [Sizes the graph takes to be equal]
        torch.export gives sizes that were equal in the example one symbol, and reads
        it from one of the inputs: a position table of batch 1 traced beside a batch
        of 1 (or, in a call ``generate`` makes, beside a batch of 2 with position ids
        of 2) is taken to have the batch's size. A call where they differ (the table
        broadcasts) would run the graph on the wrong size; it is a call of another
        pattern instead, so it gets a graph of its own or is refused by name."""
        if not self.same_sizes:
            return None
        where = [(p, v) for p, v in zip(paths, leaves, strict=True)]
        tensors = [(p, v) for p, v in where if isinstance(v, Tensor)]
        for group in self.same_sizes:
            seen: tuple[str, int, int] | None = None
            for i, d in group:
                if i >= len(tensors) or d >= tensors[i][1].dim():
                    return f"the inputs have other ranks than when traced ({group})"
                path, t = tensors[i]
                size = int(t.shape[d])
                if seen is None:
                    seen = (path, d, size)
                elif size != seen[2]:
                    return (
                        f"{seen[0]} (dim {seen[1]}) and {path} (dim {d}) had one size "
                        f"when traced, which the graph reads from one of them, and now "
                        f"differ: {seen[2]} and {size}"
                    )
        return None


@dataclass(frozen=True)
class Fill:
    """``argument=None`` means ones shaped like ``like`` (a padding mask that masks
    nothing), as convert verified on the example: a call that leaves it out can
    replay a graph traced with it."""

    argument: str
    like: str
    dtype: torch.dtype

    def apply(self, arguments: dict[str, Any]) -> bool:
        """Fill the argument in place where it is None; True when it did."""
        like = arguments.get(self.like)
        if arguments.get(self.argument, 0) is not None or not isinstance(like, Tensor):
            return False
        arguments[self.argument] = torch.ones(
            like.shape, dtype=self.dtype, device=like.device
        )
        return True


def tensor_leaves(tree: Any) -> list[Tensor]:
    """Every tensor in a nest of tuples, lists and dicts, in pytree order."""
    return [v for v in pytree.tree_leaves(tree) if isinstance(v, Tensor)]


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # an object whose == is not a truth value
        return False


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def _structure(want: pytree.TreeSpec, got: pytree.TreeSpec) -> str:
    """Name the first argument whose structure differs (None vs tensor, say)."""
    names_want, names_got = want.context, got.context
    for name, a, b in zip(
        names_want, want.children_specs, got.children_specs, strict=False
    ):
        if a != b:
            return f"[{name!r}] changed from {_kind(a)} to {_kind(b)}"
    return f"the arguments changed from {names_want} to {names_got}"


def _kind(spec: pytree.TreeSpec) -> str:
    if spec.is_leaf():
        return "a value"
    if spec.type is type(None):
        return "None"
    return f"a {spec.type.__name__} of {spec.num_leaves} values"
