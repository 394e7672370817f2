"""Every reversible family against storing mode: outputs, input and parameter
gradients, running statistics, dropout and autocast replay, check_reconstruction,
errors (tests/runtime/families.py builds the stages)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

import revcompile
from revcompile.runtime.couplings import FAMILIES, Coupling
from tests.helpers import rel_err
from tests.runtime.families import (
    NAMES,
    assert_family_matches_storing,
    inputs,
    rtol,
    stage,
)

BLOCKS = ["conv", "decoder", "encoder"]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("name", NAMES)
def test_float64_gradients_equal_storing_mode(name: str, block: str) -> None:
    """Output, input and every parameter's gradient within 1e-10 (fixed_point: its
    solver tolerance), running statistics as after one storing step."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", revcompile.ReconstructionWarning)
        rev = assert_family_matches_storing(
            stage(name, block), name, *inputs(block), rtol=rtol(name)
        )
    bns = [m for m in rev.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) == 1 for m in bns)
    assert (block == "conv") == bool(bns)
    if rev.guard:  # fixed_point: the guard saw an exact enough rebuild
        assert rev.last_reconstruction is not None
        assert not rev.last_reconstruction.anchored


@pytest.mark.parametrize("name", NAMES)
def test_dropout_masks_are_replayed(name: str) -> None:
    """Heavy dropout: equal gradients mean the backward drew the forward's masks,
    which a different seed would not give."""
    torch.manual_seed(0)
    module = stage(name, "decoder", p=0.5)
    x, mask = inputs("decoder")
    assert_family_matches_storing(module, name, x, mask, rtol=rtol(name))
    grads = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = copy.deepcopy(module)
        (g,) = torch.autograd.grad(m(x, mask).square().sum(), x)
        grads.append(g)
    assert rel_err(grads[0], grads[1]) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_replay_and_the_float64_stream(name: str) -> None:
    """CPU bf16 autocast: the recompute runs in bf16 like the forward; every family
    except fixed_point rebuilds its stream bit for bit; gradients follow storing
    mode's to bf16 rounding."""
    torch.manual_seed(0)
    module = stage(name, "decoder", p=0.0).float()
    ref = copy.deepcopy(module)
    linear = next(m for m in module.modules() if isinstance(m, nn.Linear))
    dtypes: list[torch.dtype] = []
    linear.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x = torch.randn(4, 6, 9, requires_grad=True)
    mask = torch.triu(torch.full((6, 6), -1e9), diagonal=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x, mask)
        with revcompile.storing_activations():
            y_ref = ref(x, mask)
    assert y.dtype == torch.float32 and dtypes == [torch.bfloat16]
    gx = torch.autograd.grad(y.square().sum(), x)[0]
    # The recompute (fixed_point: every iteration of the solve) runs in bf16.
    assert len(dtypes) >= 2 and set(dtypes) == {torch.bfloat16}
    assert (len(dtypes) == 2) == (name != "fixed_point")
    gx_ref = torch.autograd.grad(y_ref.square().sum(), x)[0]
    assert rel_err(y, y_ref) < 1e-6
    assert rel_err(gx, gx_ref) < 2e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (r,) = revcompile.check_reconstruction(module, x, mask)
    if name == "fixed_point":
        assert r.ok and r.max_abs_error > 0
    else:
        assert r.max_abs_error == 0.0, r


@pytest.mark.parametrize("name", NAMES)
def test_check_reconstruction_reports_and_catches_drift(name: str) -> None:
    torch.manual_seed(0)
    (r,) = revcompile.check_reconstruction(stage(name, "conv"), *inputs("conv"))
    blocks = r.couplings * FAMILIES[name].blocks_per_coupling
    assert r.ok and r.family == name and blocks in (3, 4)  # twin: 2 couplings
    drifting = stage(name, "decoder", p=0.0, guard=False)
    # A branch with its own generator: not the same function twice.
    gen = torch.Generator().manual_seed(0)
    _branch(drifting.couplings[0]).register_forward_hook(
        lambda m, i, o: o + torch.rand(o.shape, generator=gen, dtype=o.dtype)
    )
    with pytest.raises(revcompile.ReconstructionError, match="OVER TOLERANCE"):
        revcompile.check_reconstruction(drifting, *inputs("decoder"))


def _branch(coupling: Coupling) -> nn.Module:
    return coupling.F if hasattr(coupling, "F") else coupling.f  # type: ignore[return-value]


class Flaky(nn.Module):
    """A branch that returns garbage on its second call only: the reversible
    backward's recompute. Not invertible, so reconstruction drifts; storing mode
    (one call) and a re-anchored recompute (third call on) see the clean function."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: Tensor, *context: Tensor) -> Tensor:
        self.calls += 1
        out = self.inner(x, *context)
        return out * 1.5 if self.calls == 2 else out


@pytest.mark.parametrize("name", [n for n in NAMES if n != "fixed_point"])
def test_guard_reanchors_a_non_invertible_branch(name: str) -> None:
    """With the guard, gradients equal storing mode's and a ReconstructionWarning
    names the error; without it, they silently do not."""
    torch.manual_seed(0)
    x, mask = inputs("decoder")

    def flaky(guard: bool) -> revcompile.ReversibleStage:
        torch.manual_seed(0)
        s = stage(name, "decoder", p=0.0, guard=guard)
        last = s.couplings[-1]
        attr = "F" if hasattr(last, "F") else "f"
        setattr(last, attr, Flaky(getattr(last, attr)))
        return s

    guarded = flaky(True)
    with pytest.warns(revcompile.ReconstructionWarning, match="re-anchored"):
        assert_family_matches_storing(guarded, name, x, mask, rtol=rtol(name))
    step = guarded.last_reconstruction
    assert step is not None and step.anchored and step.max_abs_error > 1e-3
    assert guarded.reconstruction_log.anchored == 1
    (r,) = revcompile.check_reconstruction(guarded, x, mask)
    assert r.guarded_backwards == 1 and r.anchored == 1 and "re-anchored" in str(r)

    unguarded = flaky(False)
    ref = copy.deepcopy(unguarded)
    (g,) = torch.autograd.grad(unguarded(x, mask).square().sum(), x)
    with revcompile.storing_activations():
        (g_ref,) = torch.autograd.grad(ref(x, mask).square().sum(), x)
    assert rel_err(g, g_ref) > 1e-6


def test_fixed_point_that_does_not_converge_reanchors_or_raises() -> None:
    """A branch far from contractive: guarded (the default), the stage re-anchors,
    warns and counts it; unguarded, it raises rather than return a wrong gradient."""

    def expansive(guard: bool) -> revcompile.ReversibleStage:
        torch.manual_seed(0)
        s = stage("fixed_point", "decoder", p=0.0, guard=guard)
        for c in s.couplings:
            c.f.scale = 4.0  # type: ignore[union-attr]
        return s

    x, mask = inputs("decoder")
    guarded = expansive(True)
    assert guarded.guard
    with pytest.warns(revcompile.ReconstructionWarning, match="did not converge"):
        assert_family_matches_storing(guarded, "fixed_point", x, mask, rtol=1e-10)
    log = guarded.reconstruction_log
    assert (log.backwards, log.anchored, log.not_converged) == (1, 1, 1)
    unguarded = expansive(False)
    with pytest.raises(revcompile.ReconstructionError, match="guard=True"):
        unguarded(x, mask).sum().backward()
    assert unguarded.reconstruction_log.not_converged == 1


@pytest.mark.parametrize("name", NAMES)
def test_double_backward_raises(name: str) -> None:
    module = stage(name, "conv", n=1)
    (x,) = inputs("conv")
    with pytest.raises(revcompile.DoubleBackwardError, match="storing_activations"):
        torch.autograd.grad(module(x).sum(), x, create_graph=True)


@pytest.mark.parametrize("name", NAMES)
def test_saved_for_backward_is_flat_in_depth(name: str) -> None:
    """One final state per stage (two tensors for the two-stream families, the
    integer stream and its buffer for momentum and scaled), whatever the depth;
    fixed_point adds its input (the guard) and small per-block statistics."""
    from tests.helpers import saved_bytes

    def saved(n: int) -> int:
        torch.manual_seed(0)
        s = stage(name, "decoder", n=n, p=0.0)
        x, mask = inputs("decoder")
        return saved_bytes(lambda: s(x, mask))

    stream, mask = 4 * 6 * 9 * 8, 6 * 6 * 8  # float64 (or int64) tensors
    small = saved(2)
    assert saved(8) == small
    # momentum: x, v, one buffer page, the unit; twin etc.: two streams.
    assert small <= 3 * stream + mask + 8, small / stream


def test_families_table() -> None:
    assert next(iter(FAMILIES)) == "additive"
    splitting = {n for n, f in FAMILIES.items() if f.splits}
    assert splitting == {"additive", "hamiltonian", "scaled"}
    for name, family in FAMILIES.items():
        assert family.coupling.family == name
        assert family.coupling.splits == family.splits
    with pytest.raises(revcompile.ConversionError, match="unknown"):
        FAMILIES["momentum"].build([nn.Linear(2, 2)], beta=0.5)
    twin = FAMILIES["twin"].build([nn.Linear(2, 2) for _ in range(3)])
    assert len(twin) == 2 and twin[1].G is None
    with pytest.raises(revcompile.ConversionError, match="one family"):
        revcompile.ReversibleStage(
            [*twin, *FAMILIES["momentum"].build([nn.Linear(2, 2)])]
        )
    with pytest.raises(revcompile.ConversionError, match="full width"):
        revcompile.ReversibleStage(twin, split_sizes=(1, 1))


def test_stage_pickled_before_families_unpickles_as_additive() -> None:
    """A converted model saved with torch.save before this change has stages without
    `kind`, `guard` or `reconstruction_log`."""
    import pickle

    old = stage("additive", "conv")
    for attr in ("kind", "guard", "reconstruction_log"):
        del old.__dict__[attr]
    new = pickle.loads(pickle.dumps(old))
    assert new.kind is FAMILIES["additive"].coupling and new.guard is False
    assert_family_matches_storing(new, "additive", *inputs("conv"), rtol=1e-10)


def test_inverse_from_the_output_only_where_it_determines_the_state() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 6, 9, dtype=torch.float64)
    mask = torch.zeros(6, 6, dtype=torch.float64)
    for name in ("additive", "hamiltonian"):
        s = stage(name, "encoder").eval()
        with torch.no_grad():
            assert rel_err(s.inverse(s(x, mask), mask), x) < 1e-12
    with pytest.raises(revcompile.ConversionError, match="does not determine"):
        stage("twin", "encoder").inverse(x, mask)
