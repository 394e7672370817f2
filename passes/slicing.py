"""Sliced copies of the layers a channel split touches.

`in_sel` keeps input channels, `out_sel` output channels; each helper returns a new
module or tensor initialised from the original weights (the warm start for
fine-tuning), never a view that would share storage with the user's model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

Sel = tuple[int, int]  # [start, stop) along the stream's channel axis


def take(t: torch.Tensor, axis: int, sel: Sel) -> torch.Tensor:
    return t.detach().narrow(axis, sel[0], sel[1] - sel[0]).clone()


def _param(t: torch.Tensor, axis: int, sel: Sel) -> nn.Parameter:
    return nn.Parameter(take(t, axis, sel), requires_grad=t.requires_grad)


def slice_mixing(m: nn.Module, in_sel: Sel | None, out_sel: Sel | None) -> nn.Module:
    """Conv / Linear / transformers' Conv1D with fewer input and/or output channels."""
    new = copy.deepcopy(m)
    w_in, w_out = (0, 1) if type(m).__name__ == "Conv1D" else (1, 0)
    w = new.weight
    if in_sel is not None:
        w = take(w, w_in, in_sel)
    if out_sel is not None:
        w = take(w, w_out, out_sel)
    new.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)
    if out_sel is not None and getattr(m, "bias", None) is not None:
        new.bias = _param(m.bias, 0, out_sel)
    n_in = None if in_sel is None else in_sel[1] - in_sel[0]
    n_out = None if out_sel is None else out_sel[1] - out_sel[0]
    if isinstance(m, nn.modules.conv._ConvNd):
        new.in_channels = n_in or m.in_channels
        new.out_channels = n_out or m.out_channels
    elif isinstance(m, nn.Linear):
        new.in_features = n_in or m.in_features
        new.out_features = n_out or m.out_features
    elif hasattr(new, "nf") and n_out is not None:  # Conv1D
        new.nf = n_out
    return new


def slice_per_channel(m: nn.Module, sel: Sel) -> nn.Module:
    """A norm or depthwise conv restricted to the channels in `sel`."""
    new = copy.deepcopy(m)
    n = sel[1] - sel[0]
    for name, p in list(m.named_parameters(recurse=False)):
        setattr(new, name, _param(p, 0, sel))
    for name, b in list(m.named_buffers(recurse=False)):
        if b is not None and b.dim() > 0:
            new.register_buffer(name, take(b, 0, sel))
    if isinstance(m, nn.modules.batchnorm._NormBase):
        new.num_features = n
    elif isinstance(m, nn.LayerNorm | nn.RMSNorm) or hasattr(m, "normalized_shape"):
        new.normalized_shape = (n,)
    elif isinstance(m, nn.modules.conv._ConvNd):
        new.in_channels = new.out_channels = new.groups = n
    return new


def per_channel_size(m: nn.Module) -> tuple[int, str] | None:
    """(channels, where the channel axis must be: 'first' = dim 1, 'last') for a module
    with one parameter per channel, else None."""
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return m.num_features, "first"
    if isinstance(m, nn.modules.conv._ConvNd):
        depthwise = m.groups == m.in_channels == m.out_channels
        return (m.in_channels, "first") if depthwise else None
    shape = tuple(getattr(m, "normalized_shape", None) or ())
    if len(shape) == 1:
        # torchvision's LayerNorm2d normalises dim 1 of NCHW; the others the last.
        where = "first" if type(m).__name__ == "LayerNorm2d" else "last"
        return int(shape[0]), where
    return None


def mixing_channels(m: nn.Module) -> tuple[int, int, str] | None:
    """(input channels, output channels, axis position) of a channel-mixing module:
    a dense conv, a Linear, transformers' Conv1D (weight stored input-first)."""
    if isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1:
        return m.in_channels, m.out_channels, "first"
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features, "last"
    if type(m).__name__ == "Conv1D" and hasattr(m, "weight"):
        return int(m.weight.shape[0]), int(m.weight.shape[1]), "last"
    return None
