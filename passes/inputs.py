"""Example inputs: take the user's, or make a plausible one from the model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from revcompile.errors import TraceError

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
"""Positional and keyword arguments for ``model(*args, **kwargs)``."""

_BATCH = 2  # batch norm in train mode needs more than one value per channel
_SIDE = {1: (256,), 2: (64, 64), 3: (8, 32, 32)}


def normalise(example_inputs: Any, model: nn.Module) -> Inputs:
    """``(args, kwargs)`` from a tensor, a tuple of tensors, a dict or None."""
    if example_inputs is None:
        return infer(model)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TraceError(
                "example_inputs as a dict must map argument names to values, e.g. "
                "example_inputs={'input_ids': ids, 'attention_mask': mask}"
            )
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(
        f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword "
        f"tensors, not {type(example_inputs).__name__}; e.g. "
        f"example_inputs=(torch.randn(2, 3, 64, 64),)"
    )


def infer(model: nn.Module) -> Inputs:
    """A batch of 2 shaped for the model's first Conv, Linear or Embedding layer.

    Conv1d/2d/3d give random images of ``in_channels`` (2-D: the model's
    ``image_size`` if it declares one, else 64x64); Linear gives ``(2, in_features)``;
    Embedding gives ``(2, 16)`` token ids. Anything else raises TraceError.
    """
    first = next((m for m in model.modules() if _is_layer(m)), None)
    if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        rank = first.weight.dim() - 2
        side = _SIDE[rank]
        size = _image_size(model)
        if rank == 2 and size is not None:
            side = size
        x = torch.randn(_BATCH, first.in_channels, *side, dtype=first.weight.dtype)
        return (x,), {}
    if isinstance(first, nn.Linear):
        return (torch.randn(_BATCH, first.in_features, dtype=first.weight.dtype),), {}
    if isinstance(first, nn.Embedding):
        return (torch.randint(0, first.num_embeddings, (_BATCH, 16)),), {}
    raise TraceError(
        f"cannot infer an example input for {type(model).__name__}: it has no Conv, "
        f"Linear or Embedding layer to read the input shape from. Pass one: "
        f"example_inputs=(torch.randn(2, ...),) or a dict of keyword tensors such as "
        f"example_inputs={{'input_ids': ids, 'attention_mask': mask}}"
    )


_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)


def _is_layer(m: nn.Module) -> bool:
    """A layer whose input shape it can tell; other modules with parameters (norms, a
    ViT's class token on the root) say nothing about it."""
    return isinstance(m, _LAYERS)


def _image_size(model: nn.Module) -> tuple[int, int] | None:
    """torchvision's ViT and HF vision configs declare the size they accept."""
    size = getattr(model, "image_size", None)
    if size is None:
        size = getattr(getattr(model, "config", None), "image_size", None)
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``(2, 3, 64, 64)`` style text of the tensor inputs, for messages."""
    values = [*args, *kwargs.values()]
    return ", ".join(str(tuple(v.shape)) for v in values if isinstance(v, torch.Tensor))


def widen_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Inputs, str]:
    """An example batch of one, repeated to two; and a note saying so (or "").

    torch.export specialises sizes of 1 (they broadcast), so a graph traced on a
    batch of one would refuse every other batch size; and batch norm in training
    cannot run on one value per channel. The batch is the first dimension when every
    tensor input has one of size 1.
    """
    leaves = [
        v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)
    ]
    if not leaves or any(t.dim() == 0 or t.shape[0] != 1 for t in leaves):
        return (args, kwargs), ""

    def repeat(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.expand(_BATCH, *v.shape[1:]).clone()
        return v

    wide_args, wide_kwargs = pytree.tree_map(repeat, (args, kwargs))
    return (tuple(wide_args), dict(wide_kwargs)), (
        f"the example batch of 1 was repeated to {_BATCH} for tracing, so that other "
        f"batch sizes work"
    )
