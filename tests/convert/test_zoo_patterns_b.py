"""Small modules with the patterns behind zoo failures (timm's EfficientViM,
EfficientViT, EfficientFormer and EfficientFormerV2): each converts, trains at
another shape, and matches storing mode in float64."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

import revcompile
from revcompile.passes.ir import Policy

F64 = torch.float64


def _grads_match(converted: nn.Module, x: Tensor) -> None:
    """float64 loss and gradients equal those of storing mode."""
    c = copy.deepcopy(converted).double()
    x = x.double()
    weight = None
    grads = []
    for storing in (False, True):
        c.zero_grad(set_to_none=True)
        if storing:
            with revcompile.storing_activations():
                out = c(x)
        else:
            out = c(x)
        if weight is None:
            weight = torch.linspace(-1, 1, out.numel(), dtype=F64)
        (out.flatten() * weight).sum().backward()
        grads.append({n: p.grad.clone() for n, p in c.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[1].items():
        torch.testing.assert_close(grads[0][n], g, rtol=1e-8, atol=1e-12, msg=n)


# -- a kept block inside the branch of a converted one (EfficientViM's mixer) ------


class _ProjectionInside(nn.Module):
    """``x + B(x)`` where B holds ``proj(t) + f(t)``: a projection-shortcut block,
    checkpointable on its own, inside the branch of a block that converts."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pre = nn.Conv2d(c, c, 3, padding=1)
        self.proj = nn.Conv2d(c, c, 1)
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.post = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        t = torch.relu(self.pre(x))
        return x + self.post(self.proj(t) + self.f(t))


class _NestedNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(_ProjectionInside(c), _ProjectionInside(c))
        self.head = nn.Linear(c, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_kept_block_inside_a_converted_branch_is_not_checkpointed_apart() -> None:
    torch.manual_seed(0)
    model = _NestedNet()
    x = torch.randn(2, 3, 8, 8)
    converted = revcompile.convert(model, (x,))
    plan = converted.revcompile_plan
    assert len(plan.stages) == 1 and len(plan.stages[0].blocks) == 2
    inner = [b for b in plan.blocks if b.stage is None]
    assert len(inner) == 2
    # The inner projection blocks are recomputed as part of F and G, not apart.
    assert all(b.policy is Policy.STORE and b.predicted_bytes == 0 for b in inner)
    _grads_match(converted, torch.randn(3, 3, 8, 8))


# -- a block forked off a split's tuple (EfficientViM's h * act(z) + h * D) ---------


class _SplitGate(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c, 2 * c, 1)
        self.d = nn.Parameter(torch.full((1, c, 1, 1), 0.5))
        self.out = nn.Conv2d(c, c, 1)
        self.c = c

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, z = torch.split(self.proj(x), [self.c, self.c], dim=1)
        h = self.out(h * torch.sigmoid(z) + h * self.d)
        return h, h  # h escapes: the enclosing residual is kept


class _SplitNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.gate = _SplitGate(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        y, h = self.gate(x)
        x = x + y
        x = x + self.conv(x)
        return x.mean((2, 3)) + h.mean((2, 3))


def test_block_forked_off_a_tuple_is_not_checkpointed() -> None:
    torch.manual_seed(0)
    model = _SplitNet()
    converted = revcompile.convert(model, (torch.randn(2, 3, 8, 8),))
    for b in converted.revcompile_plan.blocks:
        if b.module_path == "gate":
            assert b.policy is not Policy.CHECKPOINT
    _grads_match(converted, torch.randn(2, 3, 8, 8))


# -- a channels-last norm on an NCHW stream (timm's LayerNorm2d) --------------------


class _LayerNorm2d(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias)
        return x.permute(0, 3, 1, 2)


class _NormFirst(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _LayerNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(self.norm(x))


class _NormNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(_NormFirst(c), _NormFirst(c))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x)).mean((2, 3))


def test_channel_axis_follows_a_permute_before_layer_norm() -> None:
    torch.manual_seed(0)
    model = _NormNet()
    converted = revcompile.convert(model, (torch.randn(2, 3, 4, 4),))
    (stage,) = converted.revcompile_plan.stages
    assert stage.channel_dim == 1 and stage.channels == 8
    _grads_match(converted, torch.randn(2, 3, 6, 6))  # another width


class _Bottleneck(nn.Module):
    """A downsampling block: a projection shortcut, so it is kept (checkpointed)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1)
        )
        self.down = nn.Conv2d(c, c, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(x) + self.body(x)


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class _Distilled(nn.Module):
    """EfficientFormer: a downsampling block, then a distilled head,
    ``(head(x) + head_dist(x)) / 2`` (a block with a projection shortcut itself)."""

    def __init__(self, c: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(_Residual(c), _Residual(c))
        self.down = _Bottleneck(c)
        self.head_down = _Bottleneck(c)
        self.norm = nn.LayerNorm(c)
        self.head, self.head_dist = nn.Linear(c, classes), nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head_down(self.down(self.blocks(self.stem(x))))
        x = self.norm(x.mean((2, 3)))
        return (self.head(x) + self.head_dist(x)) / 2


def test_the_block_the_model_ends_in_is_not_checkpointed() -> None:
    """Backward starts with the last block: checkpointing it saves nothing at the peak,
    and it holds the head the user replaces."""
    model = _Distilled()
    converted = revcompile.convert(model, torch.randn(2, 3, 16, 16))
    policies = {b.module_path: b.policy for b in converted.revcompile_plan.blocks}
    assert policies["down"] is Policy.CHECKPOINT  # not the last: they save memory
    assert policies["head_down"] is Policy.CHECKPOINT
    assert policies["blocks.0"] is Policy.REVERSIBLE
    assert policies["head_dist"] is Policy.STORE  # the distilled head
    converted.head = nn.Linear(8, 5)
    converted.head_dist = nn.Linear(8, 5)
    assert converted(torch.randn(3, 3, 16, 16)).shape == (3, 5)
