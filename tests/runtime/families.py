"""Stages of every family built from the same three kinds of residual block.

(a) ``conv``: a pre-activation conv block with BatchNorm on an uneven channel count;
(b) ``decoder``: pre-norm transformer sub-blocks (attention, MLP) with dropout and a
    causal mask as context;
(c) ``encoder``: encoder sub-blocks with a padding mask as context (for fixed_point,
    post-norm: a LayerNorm after every join, inverted from its saved row statistics).

A splitting family gets F and G on the channel halves (F: c2 -> c1, G: c1 -> c2); a
full-width family gets each block's own branch. fixed_point's branches are scaled by
0.2 (a small residual, as in Fixup/RevUp) so that they are contractive.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import revcompile
from revcompile.runtime.couplings import FAMILIES
from tests.helpers import rel_err, run_step

F64 = torch.float64
NAMES = list(FAMILIES)
C = 7  # channels of the conv stage: splits unevenly, (3, 4)
D = 9  # width of the token stages: (4, 5)
# The two families in integer arithmetic compute their stream on a 2^-48 grid that
# storing mode's floating point does not round to: running statistics agree to
# ~1e-15 relative, not bit for bit (Note [Integer stream]).
INEXACT_BUFFERS = {"momentum", "scaled"}


class Scaled(nn.Module):
    """``scale * branch(x, *context)``."""

    def __init__(self, branch: nn.Module, scale: float) -> None:
        super().__init__()
        self.branch, self.scale = branch, scale

    def forward(self, x: Tensor, *context: Any) -> Tensor:
        return self.scale * self.branch(x, *context)


class PreActConv(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv from c_in to c_out channels (bias-free convs)."""

    def __init__(self, c_in: int, c_out: int, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, c_out, 3, padding=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Single-head attention from d_in to d_out channels with an additive mask
    (context), pre-norm unless `post_norm` (then the norm follows the join)."""

    def __init__(self, d_in: int, d_out: int, p: float, pre_norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in) if pre_norm else nn.Identity()
        self.qkv = nn.Linear(d_in, 3 * 8)
        self.out = nn.Linear(8, d_out)
        self.drop = nn.Dropout(p)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # (B, T, d_in) -> 3 x (B, T, 8); mask: (T, T) or (B, 1, T), additive
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / 8**0.5 + mask
        return self.drop(self.out(self.drop(scores.softmax(-1)) @ v))


class MLP(nn.Module):
    """Pre-norm MLP from d_in to d_out with dropout; ignores the mask."""

    def __init__(self, d_in: int, d_out: int, p: float, pre_norm: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_in) if pre_norm else nn.Identity(),
            nn.Linear(d_in, 16),
            nn.GELU(),
            nn.Dropout(p),
            nn.Linear(16, d_out),
            nn.Dropout(p),
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.net(x)


def causal_mask(t: int, dtype: torch.dtype) -> Tensor:
    return torch.triu(torch.full((t, t), -1e9, dtype=dtype), diagonal=1)


def padding_mask(b: int, t: int, dtype: torch.dtype) -> Tensor:
    """(B, 1, T) additive mask hiding the last two tokens of every other sequence."""
    mask = torch.zeros(b, 1, t, dtype=dtype)
    mask[::2, :, -2:] = -1e9
    return mask


def branches(block: str, n: int, splits: bool, p: float) -> list[Any]:
    """The units `Family.build` takes for `n` blocks: (F, G) pairs or branches."""
    width = C if block == "conv" else D
    lo, hi = width // 2, width - width // 2

    def make(i: int, c_in: int, c_out: int) -> nn.Module:
        if block == "conv":
            return PreActConv(c_in, c_out)
        pre = block == "decoder"
        kind = Attention if i % 2 == 0 else MLP
        return kind(c_in, c_out, p if block == "decoder" else 0.0, pre_norm=pre)

    if splits:
        return [(make(2 * i, hi, lo), make(2 * i + 1, lo, hi)) for i in range(n)]
    return [make(i, width, width) for i in range(n)]


def stage(
    name: str, block: str, n: int = 3, p: float = 0.2, **options: Any
) -> revcompile.ReversibleStage:
    """A float64 stage of `n` blocks (couplings for a splitting family) of `block`."""
    family = FAMILIES[name]
    guard = _guard(options)
    units = branches(block, n, family.splits, p)
    if name == "fixed_point":
        units = [Scaled(u, 0.2) for u in units]
        if block == "encoder":  # post-norm: LN(x + f(x)), inverted exactly
            units = [(u, nn.LayerNorm(D)) for u in units]
    dim = 1 if block == "conv" else -1
    couplings = family.build(units, **options)
    return revcompile.ReversibleStage(couplings, dim=dim, **guard).double()


def _guard(options: dict[str, Any]) -> dict[str, Any]:
    return {"guard": options.pop("guard")} if "guard" in options else {}


def inputs(block: str, requires_grad: bool = True) -> tuple[Tensor, ...]:
    if block == "conv":
        x = torch.randn(4, C, 5, 5, dtype=F64)
        return (x.requires_grad_(requires_grad),)
    x = torch.randn(4, 6, D, dtype=F64).requires_grad_(requires_grad)
    if block == "decoder":
        return x, causal_mask(6, F64)
    return x, padding_mask(4, 6, F64)


def rtol(name: str) -> float:
    """float64 agreement with storing mode: rounding, or the solver's tolerance."""
    return 1e-6 if name == "fixed_point" else 1e-10


def assert_family_matches_storing(
    module: nn.Module,
    name: str,
    *inputs: Any,
    rtol: float,
    loss_fn: Callable[[Tensor], Tensor] | None = None,
) -> nn.Module:
    """As tests.helpers.assert_matches_storing, per parameter, with the running
    statistics of the integer-arithmetic families compared to 1e-12."""
    rev, ref = module, copy.deepcopy(module)
    out_r, in_r, p_r = run_step(rev, inputs, storing=False, loss_fn=loss_fn)
    out_s, in_s, p_s = run_step(ref, inputs, storing=True, loss_fn=loss_fn)
    assert rel_err(out_r, out_s) <= rtol, ("output", rel_err(out_r, out_s))
    for i, (a, b) in enumerate(zip(in_r, in_s, strict=True)):
        assert (a is None) == (b is None), f"input {i}: grad presence differs"
        if a is not None:
            assert rel_err(a, b) <= rtol, (f"input {i}", rel_err(a, b))
    assert p_r.keys() == p_s.keys()
    for key in p_r:
        a, b = p_r[key], p_s[key]
        assert (a is None) == (b is None), f"{key}: grad presence differs"
        if a is not None:
            assert rel_err(a, b) <= rtol, (key, rel_err(a, b))
    for (key, a), (_, b) in zip(rev.named_buffers(), ref.named_buffers(), strict=True):
        if name in INEXACT_BUFFERS and a.is_floating_point():
            assert rel_err(a, b) <= 1e-12, (key, rel_err(a, b))
        else:
            assert torch.equal(a, b), f"buffer {key} differs"
    return rev
