"""Reading what the tracer left in ``node.meta``: shapes, dtypes, bytes, module paths.

Both graph forms carry the same facts under different keys: ``torch.export`` puts a fake
tensor in ``meta["val"]``, fx's ShapeProp puts a ``TensorMetadata`` in
``meta["tensor_meta"]``. The passes read them only through this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

MODULE_PATH = "module_path"
"""``node.meta`` key the tracer sets: the innermost module's dotted path ("" at top)."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize


def _info(value: Any) -> TensorInfo | None:
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or not isinstance(dtype, torch.dtype):
        return None
    try:
        return TensorInfo(tuple(int(d) for d in shape), dtype)
    except (TypeError, ValueError):  # an unbacked symbolic size: no concrete shape
        return None


def tensor_info(node: fx.Node) -> TensorInfo | None:
    """Shape and dtype of a node's tensor output, or None when it is not one tensor."""
    # ShapeProp's concrete shapes first: export's "val" may hold symbolic sizes.
    if "tensor_meta" in node.meta:
        return _info(node.meta["tensor_meta"])
    return _info(node.meta.get("val"))


def output_bytes(node: fx.Node) -> int:
    """Bytes of every tensor a node outputs (a tuple output counts each element)."""
    value = node.meta.get("tensor_meta", node.meta.get("val"))
    info = _info(value)  # first: TensorMetadata is itself a NamedTuple
    if info is not None:
        return info.nbytes
    if isinstance(value, (tuple, list)):
        infos = (_info(v) for v in value)
        return sum(i.nbytes for i in infos if i is not None)
    return 0


def is_float_tensor(node: fx.Node) -> bool:
    info = tensor_info(node)
    if info is not None:
        return info.dtype.is_floating_point or info.dtype.is_complex
    # A tuple of tensors (a leaf module returning several): float if any element is.
    value = node.meta.get("tensor_meta", node.meta.get("val"))
    if isinstance(value, (tuple, list)):
        infos = [_info(v) for v in value]
        return any(i is not None and i.dtype.is_floating_point for i in infos)
    return False


def module_path(node: fx.Node) -> str:
    """Dotted path in the model of the module a node was traced in ("" for the
    model's forward); for a module call, the called module's."""
    if MODULE_PATH in node.meta:
        return node.meta[MODULE_PATH]
    return str(node.target) if node.op == "call_module" else ""


def set_module_paths(gm: fx.GraphModule, prefix: str = "") -> None:
    """Store the innermost ``nn_module_stack`` path of each node under ``MODULE_PATH``.

    fx records paths like ``layer1.0.relu@1`` for a module's second call; export records
    ``L['self'].layer1[0]`` in some versions. Both are normalised to ``layer1.0.relu``.
    A traced submodule's graph (the ``m`` of Note [Trace the call, not the signature])
    gets paths in the whole model: `prefix`, the submodule's own path, in front.
    """
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        path = ""
        if stack:
            path = str(list(stack.values())[-1][0])
        path = _normalise(path)
        if path == "m" or path.startswith("m."):
            path = path[2:]
        if node.op == "call_module":  # the stack ends at the caller
            path = str(node.target)
        node.meta[MODULE_PATH] = ".".join(p for p in (prefix, path) if p)


def _normalise(path: str) -> str:
    path = path.split("@")[0]
    if path.startswith("L['self']"):
        path = path[len("L['self']") :]
    for old, new in (("['", "."), ("']", ""), ("[", "."), ("]", "")):
        path = path.replace(old, new)
    return path.strip(".")


def where(node: fx.Node) -> str:
    """Module path for messages: ``layer1.0.conv1``, or ``(top level)``."""
    return module_path(node) or "(top level)"
