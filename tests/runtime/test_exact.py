"""The integer stream of momentum and scaled (Note [Integer stream]) and the
fixed-point probe: exact at depth where float division drifts, and honest records."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import revcompile
from revcompile.runtime.couplings import (
    FAMILIES,
    FixedPointCoupling,
    MomentumCoupling,
    ScaledCoupling,
    probe_fixed_point,
)
from revcompile.runtime.couplings.exact import InfoBuffer, IntArith, Ratio


@pytest.mark.parametrize(
    ("value", "n", "d"), [(0.9, 9, 10), (0.1, 1, 10), (0.3, 3, 10)]
)
def test_factors_are_small_fractions(value: float, n: int, d: int) -> None:
    assert Ratio.of(value, "g") == Ratio(n, d)
    with pytest.raises(revcompile.ConversionError, match="not be invertible"):
        Ratio.of(1e-4, "gamma")


def test_exact_multiply_is_undone_bit_for_bit_negatives_and_pages_included() -> None:
    """Floor division keeps negative values exact (momentumnet's truncating division
    does not); 200 multiplies by 1/3 need 317 bits, six int64 pages."""
    g = torch.Generator().manual_seed(0)
    t0 = torch.randint(-(2**50), 2**50, (1000,), generator=g)
    t0[:4] = torch.tensor([-1, 0, 1, -(2**50)])
    buf, r = InfoBuffer(), Ratio(1, 3)
    t = t0
    for _ in range(200):
        t = buf.mul(t, r)
    assert len(buf.pages) == 6
    for _ in range(200):
        t = buf.div(t, r)
    assert torch.equal(t, t0) and not buf.pages


@pytest.mark.parametrize(
    ("make", "options"),
    [
        (MomentumCoupling, {"gamma": 0.5}),
        (ScaledCoupling, {"l": 0.5, "b": 0.7}),
    ],
    ids=["momentum", "scaled"],
)
def test_exact_at_depth_where_float_division_drifts(make, options) -> None:
    """64 couplings in float32: the integer stream rebuilds its input up to the input's
    own rounding to the grid; float division (MEFT's, momentumnet's without its
    buffer) loses it entirely, and says so when built."""

    def build(exact: bool) -> revcompile.ReversibleStage:
        torch.manual_seed(0)
        if make is MomentumCoupling:
            cs = [make(nn.Linear(8, 8), exact=exact, **options) for _ in range(64)]
        else:
            cs = [
                make(nn.Linear(4, 4), nn.Linear(4, 4), exact=exact, **options)
                for _ in range(64)
            ]
        return revcompile.ReversibleStage(cs, dim=-1)

    x = torch.randn(16, 8)
    (r,) = revcompile.check_reconstruction(build(True), x)
    assert r.max_abs_error == 0.0
    with (
        pytest.warns(revcompile.ReconstructionWarning, match="exact=True"),
        pytest.raises(revcompile.ReconstructionError),
    ):
        revcompile.check_reconstruction(build(False), x)


def test_a_rebuild_that_overflows_to_nan_is_the_worst_error() -> None:
    """Float division by 0.1 over 32 couplings drifts to 1e26; in deeper stages it
    reaches nan, which must read as an infinite error (the guard and the check both
    use this), never as none."""
    from revcompile.runtime.guard import rebuild_error

    rebuilt = (torch.tensor([1.0, float("nan")]), torch.zeros(2))
    err, _ = rebuild_error(rebuilt, (torch.ones(2), torch.zeros(2)), 1e-4)
    assert err == float("inf")
    torch.manual_seed(0)
    cs = [
        ScaledCoupling(nn.Linear(4, 4), nn.Linear(4, 4), l=0.1, exact=False)
        for _ in range(32)
    ]
    stage = revcompile.ReversibleStage(cs, dim=-1)
    with pytest.warns(revcompile.ReconstructionWarning):
        (r,) = revcompile.check_reconstruction(stage, torch.randn(8, 8), atol=1e300)
    assert r.max_abs_error > 1e20


def test_overflow_of_the_integer_stream_raises() -> None:
    """A branch 2^20 times the input's magnitude exceeds the 2^14 headroom."""
    big = nn.Linear(4, 4)
    nn.init.constant_(big.bias, 2.0**20)
    stage = revcompile.ReversibleStage([MomentumCoupling(big)])
    with pytest.raises(revcompile.ReconstructionError, match="headroom"):
        stage(torch.randn(3, 4, requires_grad=True))
    with torch.no_grad():  # a plain forward: float arithmetic, nothing to rebuild
        stage(torch.randn(3, 4))


def test_int_arith_roundtrip_is_exact_on_its_grid() -> None:
    x = torch.randn(5, 7, dtype=torch.float64)
    arith = IntArith.for_input((x,))
    assert torch.equal(arith.decode(arith.encode(arith.decode(arith.encode(x)))),
                       arith.decode(arith.encode(x)))  # fmt: skip
    assert (arith.decode(arith.encode(x)) - x).abs().max() <= arith.unit


class Contractive(nn.Module):
    """``0.3 * tanh(W x)`` with ||W|| about 1: Lipschitz below 0.3."""

    def __init__(self, d: int, scale: float = 0.3) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.tanh(self.bn(self.lin(x)))


def test_probe_measures_convergence_and_never_raises() -> None:
    torch.manual_seed(0)
    f = Contractive(16).double()
    x = torch.randn(32, 16, dtype=torch.float64)
    before = [b.clone() for b in f.buffers()]
    probe = probe_fixed_point(f, x)
    assert probe.converged and probe.error < 1e-8 and 0 < probe.contraction < 0.5
    assert 2 <= probe.iterations < 20 and "converges" in str(probe)
    assert all(torch.equal(a, b) for a, b in zip(before, f.buffers(), strict=True))
    plain = probe_fixed_point(f, x, memory=0)
    assert plain.iterations > probe.iterations  # Anderson accelerates
    f.scale = 5.0  # far from contractive
    bad = probe_fixed_point(f, x, max_iter=10)
    assert not bad.converged and bad.error == float("inf")
    assert "does NOT converge" in str(bad)


def test_fixed_point_uses_the_forward_batch_statistics() -> None:
    """Train-mode BatchNorm inside f: the solve normalises with the forward's batch
    statistics, so the inverse converges to the forward's input; running statistics
    are updated once."""
    torch.manual_seed(0)
    stage = revcompile.ReversibleStage(
        [FixedPointCoupling(Contractive(16)) for _ in range(3)]
    ).double()
    x = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)
    stage(x).square().sum().backward()
    step = stage.last_reconstruction
    assert step is not None and not step.anchored and step.max_abs_error < 1e-8
    bns = [m for m in stage.modules() if isinstance(m, nn.BatchNorm1d)]
    assert all(int(m.num_batches_tracked) == 1 for m in bns)
    assert all(m.training and m.track_running_stats for m in bns)


def test_post_join_layernorm_is_inverted_from_its_row_statistics() -> None:
    """``y = LN(x + f(x))``: two numbers per row saved per block."""
    from tests.helpers import saved_bytes

    torch.manual_seed(0)
    family = FAMILIES["fixed_point"]
    units = [(Contractive(16), nn.LayerNorm(16)) for _ in range(4)]
    stage = revcompile.ReversibleStage(family.build(units)).double()
    x = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)
    (r,) = revcompile.check_reconstruction(stage, x)
    assert r.ok and r.max_abs_error < 1e-8
    # y and the guard's input (2 x 32 x 16) + per block mean, rstd (2 x 32) and the
    # batch norm's statistics (2 x 16), float64.
    assert saved_bytes(lambda: stage(x)) == 8 * (2 * 32 * 16 + 4 * (2 * 32 + 2 * 16))
