"""What `stage.py` measures: one BasicBlock-style coupling stage, built as each method
runs it (on the same F and G modules wherever the function is the same), and one
training step of it."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

import revcompile

CHANNELS = 64
METHODS = ("storing", "residual", "checkpoint", "revcompile", "memcnn", "revlib")
METHODS += ("revtorch",)
# Benchmarked when installed, never dependencies of revcompile.
OPTIONAL = ("memcnn", "revlib", "revtorch")


def branch(c: int) -> nn.Module:
    """conv-BN-ReLU-conv-BN, as in torchvision's BasicBlock (in-place ReLU included)."""
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(inplace=True),
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        nn.BatchNorm2d(c),
    )


class BasicBlock(nn.Module):
    """torchvision's stride-1 BasicBlock: relu(x + branch(x)), full width."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = branch(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + self.branch(x))


class Checkpointed(nn.Module):
    """The couplings, each recomputed in backward by `torch.utils.checkpoint`."""

    def __init__(self, stage: revcompile.ReversibleStage) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.stage.split(x)
        for c in self.stage.couplings:
            x1, x2 = checkpoint(c, x1, x2, use_reentrant=False)
        return self.stage.join(x1, x2)


class MemcnnStage(nn.Sequential):
    """memcnn's wrappers in sequence, fed a view of the input: memcnn sets ``.grad``
    on its inputs by hand *and* returns that gradient, which doubles a leaf input's
    gradient. Inside a network the stage input is never a leaf; the view makes it so
    here too, at no cost."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.view_as(x))


class Storing(nn.Module):
    """The reversible stage switched to plain autograd for every call."""

    def __init__(self, stage: revcompile.ReversibleStage) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        with revcompile.storing_activations():
            return self.stage(x)


def build(method: str, n: int) -> tuple[nn.Module, nn.Module | None]:
    """The module to measure and, where it computes the same function, the storing
    stage on the same F and G modules to check it against."""
    half = CHANNELS // 2
    if method == "residual":
        return nn.Sequential(*[BasicBlock(CHANNELS) for _ in range(n)]), None
    pairs = [(branch(half), branch(half)) for _ in range(n)]
    stage = revcompile.ReversibleStage(
        [revcompile.AdditiveCoupling(f, g) for f, g in pairs], dim=1
    )
    reference = Storing(stage)
    if method == "storing":
        return reference, None
    if method == "revcompile":
        return stage, reference
    if method == "checkpoint":
        return Checkpointed(stage), reference
    if method == "memcnn":
        import memcnn

        # keep_input=True on the first block only: the stage input belongs to the
        # caller (still referenced there), so freeing it would credit memcnn with
        # memory no other method is allowed to drop.
        blocks = [
            memcnn.InvertibleModuleWrapper(
                memcnn.AdditiveCoupling(f, g, split_dim=1), keep_input=i == 0
            )
            for i, (f, g) in enumerate(pairs)
        ]
        return MemcnnStage(*blocks), reference
    if method == "revlib":
        import revlib

        # Each module maps (a, b) -> (b, a + m(b)): F then G gives (y1, y2).
        modules = [m for pair in pairs for m in pair]
        return revlib.ReversibleSequential(*modules, split_dim=1), reference
    if method == "revtorch":
        import revtorch.revtorch as rt

        blocks = nn.ModuleList([rt.ReversibleBlock(f, g, 1) for f, g in pairs])
        return rt.ReversibleSequence(blocks), reference
    raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@functools.cache
def loss_weight(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    # Weights every output element differently, so no gradient is trivially zero.
    return torch.linspace(-1, 1, shape.numel(), dtype=dtype).view(shape)


def step(
    model: nn.Module,
    x: Tensor,
    keep: bool = False,
    pack: Callable[[Tensor], Any] | None = None,
) -> Tensor | None:
    """One forward+backward (under the saved-tensor hook `pack`, if given); returns a
    copy of the output if `keep`. The output itself is dropped before backward, as in
    a training loop: a stage can only free its saved output early if no one else
    holds it."""
    model.zero_grad(set_to_none=True)
    x.grad = None
    with contextlib.ExitStack() as stack:
        if pack is not None:
            stack.enter_context(saved_tensors_hooks(pack, lambda t: t))
        out = model(x)
    kept = out.detach().clone() if keep else None
    loss = (out * loss_weight(out.shape, out.dtype)).sum()
    del out
    loss.backward()
    return kept


def check(model: nn.Module, reference: nn.Module) -> float:
    """Largest relative error of output, input and parameter gradients against the
    storing stage on the same weights, in float64 so that only a different function
    (not float32 reconstruction error through N couplings) shows."""
    model.double()  # converts the shared F and G modules in place
    x = torch.randn(4, CHANNELS, 8, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for m in (reference, model):
        out = step(m, x, keep=True)
        assert out is not None and x.grad is not None
        grads = [p.grad.clone() for p in reference.parameters() if p.grad is not None]
        results.append([out, x.grad.clone(), *grads])
    model.float()
    ref, got = results
    if len(ref) != len(got):
        return float("inf")
    return max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        for a, b in zip(got, ref, strict=True)
    )


def saved_counter(model: nn.Module) -> tuple[Callable[..., Any], dict[int, int]]:
    """A saved-tensor pack hook and the unique storages it saw (parameters excluded):
    what autograd keeps for backward. memcnn and revtorch keep their tensors as ctx
    attributes, which no hook sees: their peak RSS is the number to trust."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    return pack, seen
