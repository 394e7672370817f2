"""Exactly-once state, autocast, autograd corners and errors of a reversible stage."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import revcompile
from tests.helpers import assert_matches_storing, rel_err
from tests.runtime.blocks import conv_stage, mlp_stage

F64 = torch.float64


def test_batchnorm_statistics_updated_exactly_once() -> None:
    """The backward recompute must not move running stats or num_batches_tracked."""
    stage = conv_stage(3).double()
    plain = copy.deepcopy(stage)
    x = torch.randn(4, 16, 5, 5, dtype=F64, requires_grad=True)
    stage(x).sum().backward()
    with revcompile.storing_activations():
        plain(x).sum().backward()
    for (name, a), (_, b) in zip(
        stage.named_buffers(), plain.named_buffers(), strict=True
    ):
        assert torch.equal(a, b), name
    bns = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(int(m.num_batches_tracked) == 1 for m in bns)
    assert all(m.track_running_stats for m in bns)


def test_other_mutated_buffers_updated_exactly_once() -> None:
    """Any buffer a branch updates in place (here a call counter) is left as the
    forward left it."""

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            return self.lin(x)

    stage = revcompile.ReversibleStage(
        [revcompile.AdditiveCoupling(Counting(), Counting())], dim=-1
    )
    stage(torch.randn(2, 8, requires_grad=True)).sum().backward()
    assert [int(b) for b in stage.buffers()] == [1, 1]


def test_rng_state_after_step_matches_storing_mode() -> None:
    """Replaying dropout masks must not perturb the generator seen after backward."""
    stage = mlp_stage(2, p=0.5)
    x = torch.randn(2, 3, 16, requires_grad=True)
    torch.manual_seed(1)
    stage(x).sum().backward()
    after_reversible = torch.rand(4)
    torch.manual_seed(1)
    with revcompile.storing_activations():
        stage(x).sum().backward()
    assert torch.equal(after_reversible, torch.rand(4))


def test_bf16_autocast_recompute_runs_under_forward_autocast() -> None:
    """CPU bf16 autocast: the recompute sees bf16 matmuls, gradients agree."""
    stage = mlp_stage(2, d=16, p=0.0)
    ref = copy.deepcopy(stage)
    dtypes: list[torch.dtype] = []
    lin = stage.couplings[0].F[1]
    lin.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x = torch.randn(4, 6, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = stage(x)
        with revcompile.storing_activations():
            y_ref = ref(x)
    assert dtypes == [torch.bfloat16]  # forward only, so far
    gx = torch.autograd.grad(y.float().square().sum(), x)[0]
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # the recompute, in bf16
    gx_ref = torch.autograd.grad(y_ref.float().square().sum(), x)[0]
    assert torch.equal(y, y_ref)
    # Both runs round F and G to bf16 (eps 7.8e-3); the rebuilt stream differs from the
    # stored one by fp32 rounding, which may flip a bf16 rounding here and there.
    assert rel_err(gx, gx_ref) < 2e-2


def test_retain_graph_and_autograd_grad() -> None:
    stage = conv_stage(2).double()
    ref = copy.deepcopy(stage)
    x = torch.randn(2, 16, 4, 4, dtype=F64, requires_grad=True)
    params = list(stage.parameters())
    loss = stage(x).square().sum()
    first = torch.autograd.grad(loss, [x, *params], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *params])
    with revcompile.storing_activations():
        expected = torch.autograd.grad(ref(x).square().sum(), [x, *ref.parameters()])
    for a, b, e in zip(first, second, expected, strict=True):
        assert torch.equal(a, b)
        assert rel_err(a, e) < 1e-10


def test_gradient_accumulation_and_hooks() -> None:
    """Two micro-batches accumulate into .grad; parameter hooks see every gradient."""
    stage = conv_stage(2).double()
    ref = copy.deepcopy(stage)
    seen: list[int] = []
    for p in stage.parameters():
        p.register_hook(lambda g: seen.append(1) or g)
    xs = [torch.randn(2, 16, 4, 4, dtype=F64) for _ in range(2)]
    for x in xs:
        stage(x).square().sum().backward()
    with revcompile.storing_activations():
        for x in xs:
            ref(x).square().sum().backward()
    assert len(seen) == 2 * len(list(stage.parameters()))
    for a, b in zip(stage.parameters(), ref.parameters(), strict=True):
        assert rel_err(a.grad, b.grad) < 1e-10


def test_double_backward_raises_a_clear_error() -> None:
    stage = conv_stage(1).double()
    x = torch.randn(2, 16, 4, 4, dtype=F64, requires_grad=True)
    with pytest.raises(revcompile.DoubleBackwardError, match="storing_activations"):
        torch.autograd.grad(stage(x).sum(), x, create_graph=True)
    with revcompile.storing_activations():  # the fix the message suggests works
        (g,) = torch.autograd.grad(stage(x).square().sum(), x, create_graph=True)
        g.sum().backward()


def test_input_is_never_modified_and_inplace_branch_is_refused() -> None:
    stage = conv_stage(2)
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    before, version = x.detach().clone(), x._version
    stage(x).sum().backward()
    assert torch.equal(x.detach(), before) and x._version == version

    bad = revcompile.ReversibleStage(
        [revcompile.AdditiveCoupling(nn.ReLU(inplace=True), nn.Linear(2, 2))], dim=-1
    )
    with pytest.raises(revcompile.ConversionError, match="in place"):
        bad(torch.randn(3, 4, requires_grad=True))


def test_no_grad_and_eval_are_plain_forwards() -> None:
    stage = conv_stage(2).eval()
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    with torch.no_grad():
        y = stage(x)
    assert y.grad_fn is None
    with revcompile.storing_activations():
        ref = stage(x)
    assert torch.equal(y, ref)
    # eval() with grad enabled (frozen-BN fine-tuning) still trains reversibly.
    assert type(stage(x).grad_fn).__name__ == "ReversibleFunctionBackward"
    assert_matches_storing(stage.double(), x.double(), rtol=1e-10)


def test_bad_split_is_explained() -> None:
    stage = revcompile.ReversibleStage(
        [revcompile.AdditiveCoupling(nn.Identity(), nn.Identity())], split_sizes=(3, 3)
    )
    with pytest.raises(revcompile.ConversionError, match="add up to 6"):
        stage(torch.randn(2, 8))
    with pytest.raises(ValueError, match="at least one coupling"):
        revcompile.ReversibleStage([])


class _Shift(nn.Module):
    """``x + bias`` with a full-shape bias: autograd hands back the incoming gradient
    itself as the bias's gradient, an alias of a tensor the backward rebuilds in
    place (Note [Rebuild in place] in couplings/base.py)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(shape, dtype=F64))

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return x + self.bias + scale


def test_gradients_that_alias_the_rebuilt_halves_stay_intact() -> None:
    """Parameter and context gradients equal to the incoming gradient are kept as
    they were, not overwritten by the in-place rebuild of later couplings."""
    shape = (3, 4)
    couplings = [
        revcompile.AdditiveCoupling(_Shift(shape), _Shift(shape)) for _ in "ab"
    ]
    stage = revcompile.ReversibleStage(couplings, dim=1)
    x = torch.randn(3, 8, dtype=F64, requires_grad=True)
    scale = torch.randn(3, 4, dtype=F64, requires_grad=True)
    assert_matches_storing(stage, x, scale, rtol=1e-12)


def test_output_held_by_the_caller_is_not_rebuilt_in_place() -> None:
    """Backward rebuilds into tensors of its own; the saved output is read, never
    written, so a caller holding it (or a second backward) sees it unchanged."""
    stage = conv_stage(3).double()
    x = torch.randn(2, 16, 4, 4, dtype=F64, requires_grad=True)
    out = stage(x)
    kept = out.detach().clone()
    version = out._version
    out.square().sum().backward(retain_graph=True)
    assert torch.equal(out, kept) and out._version == version
    first = x.grad.clone()
    x.grad = None
    out.square().sum().backward()
    assert torch.equal(x.grad, first)
