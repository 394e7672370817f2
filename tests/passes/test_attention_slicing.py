"""nn.MultiheadAttention in a branch is sliced, not zero-padded: the same function at
the cost of one attention branch for F and G together."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, fx, nn

import revcompile
from revcompile.passes import restrict as restrict_module
from revcompile.passes.channel_split import split_branch
from revcompile.runtime.attention import SlicedMultiheadAttention
from revcompile.runtime.branches import narrow_channels, pad_channels
from tests.helpers import assert_matches_storing, rel_err

F64 = torch.float64
C, HEADS, N, L = 12, 3, 2, 5


def _mha(**kw: Any) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(C, HEADS, **kw).double()
    with torch.no_grad():  # nonzero biases, so a wrong slice of them shows
        for p in (m.in_proj_bias, m.out_proj.bias):
            if p is not None:
                p.normal_()
    return m


def _masks(kpm: str | None, attn: str | None) -> dict[str, Tensor]:
    """Masks that leave every query at least key 0, so no softmax row is all -inf."""
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[0, -2:] = True
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    per_head = torch.rand(N * HEADS, L, L) > 0.5
    per_head[..., 0] = False
    bool_masks = {"kpm": pad, "2d": causal, "3d": per_head}

    def as_float(m: Tensor) -> Tensor:
        return torch.zeros(m.shape, dtype=F64).masked_fill(m, float("-inf"))

    out = {}
    for name, kind in (("key_padding_mask", kpm), ("attn_mask", attn)):
        if kind is not None:
            mask = bool_masks[kind.split("_")[0]]
            out[name] = as_float(mask) if kind.endswith("float") else mask
    return out


# (need_weights, average_attn_weights, is_causal, key_padding_mask, attn_mask)
CASES = [
    (True, True, False, None, None),
    (False, True, False, None, None),
    (False, True, False, "kpm_bool", None),
    (True, False, False, "kpm_float", None),
    (False, True, True, None, "2d_bool"),  # SDPA's own causal path
    (True, True, True, None, "2d_float"),
    (False, True, True, "kpm_bool", "2d_bool"),
    (False, True, False, "kpm_float", "3d_float"),
    (True, False, False, "kpm_bool", "3d_bool"),
]
SELS = [((6, 12), (0, 6)), ((0, 5), None), (None, (5, 12))]  # both, in-only, out-only


def _reference(
    m: nn.Module, x: Tensor, in_sel: Any, out_sel: Any, axis: int, **kw: Any
) -> tuple[Tensor, Tensor | None]:
    """The spec: MHA on the zero-padded half, its output narrowed."""
    full = x if in_sel is None else pad_channels(x, axis, C, in_sel[0])
    out, weights = m(full, full, full, **kw)
    return (out if out_sel is None else narrow_channels(out, axis, *out_sel)), weights


@pytest.mark.parametrize("sels", SELS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_sliced_attention_equals_padded_attention_narrowed(
    sels: tuple, batch_first: bool, case: tuple
) -> None:
    need_weights, average, is_causal, kpm, attn = case
    in_sel, out_sel = sels
    m = _mha(batch_first=batch_first)
    n = C if in_sel is None else in_sel[1] - in_sel[0]
    x = torch.randn((N, L, n) if batch_first else (L, N, n), dtype=F64)
    kw = dict(
        need_weights=need_weights,
        average_attn_weights=average,
        is_causal=is_causal,
        **_masks(kpm, attn),
    )
    want, want_w = _reference(m, x, in_sel, out_sel, 2, **kw)
    got, got_w = SlicedMultiheadAttention(m, in_sel, out_sel)(x, x, x, **kw)
    assert got.shape == want.shape and rel_err(got, want) < 1e-12
    assert (got_w is None) == (want_w is None)
    if want_w is not None:
        assert got_w is not None and rel_err(got_w, want_w) < 1e-12


@pytest.mark.parametrize("need_weights", [True, False])
def test_unbatched_input_and_input_gradient(need_weights: bool) -> None:
    m = _mha()
    x = torch.randn(L, 6, dtype=F64, requires_grad=True)
    want, _ = _reference(m, x, (6, 12), (0, 6), 1, need_weights=need_weights)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    sliced = SlicedMultiheadAttention(m, (6, 12), (0, 6))
    got, _ = sliced(x, x, x, need_weights=need_weights)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    assert rel_err(got, want) < 1e-12 and rel_err(g_got, g_want) < 1e-12


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_only_in_training_and_with_the_same_draws(need_weights: bool) -> None:
    m, x = _mha(dropout=0.3, batch_first=True), torch.randn(N, L, 6, dtype=F64)
    sliced = SlicedMultiheadAttention(m, (0, 6), (6, 12))
    torch.manual_seed(1)
    want, _ = _reference(m, x, (0, 6), (6, 12), 2, need_weights=need_weights)
    torch.manual_seed(1)
    got, _ = sliced(x, x, x, need_weights=need_weights)
    assert rel_err(got, want) < 1e-12
    m.eval(), sliced.eval()
    want, _ = _reference(m, x, (0, 6), (6, 12), 2, need_weights=need_weights)
    assert rel_err(sliced(x, x, x, need_weights=need_weights)[0], want) < 1e-12


def test_weights_are_restricted_copies() -> None:
    m = _mha()
    in_only = SlicedMultiheadAttention(m, (6, 12))
    both = SlicedMultiheadAttention(in_only, out_sel=(0, 6))
    assert (both.in_sel, both.out_sel) == ((6, 12), (0, 6))
    assert torch.equal(both.in_proj_weight, m.in_proj_weight[:, 6:])
    assert torch.equal(both.in_proj_bias, m.in_proj_bias)
    assert torch.equal(both.out_proj_weight, m.out_proj.weight[:6])
    assert torch.equal(both.out_proj_bias, m.out_proj.bias[:6])
    assert all(isinstance(p, nn.Parameter) for p in both.parameters())
    assert both.in_proj_weight.data_ptr() != in_only.in_proj_weight.data_ptr()


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.MultiheadAttention(C, HEADS, kdim=8, vdim=8),
        lambda: nn.MultiheadAttention(C, HEADS, add_bias_kv=True),
        lambda: nn.MultiheadAttention(C, HEADS, add_zero_attn=True),
        lambda: SlicedMultiheadAttention(nn.MultiheadAttention(C, HEADS), (0, 6)),
        lambda: nn.Linear(C, C),
    ],
)
def test_what_cannot_be_sliced_is_refused(make: Callable[[], nn.Module]) -> None:
    with pytest.raises(ValueError):
        SlicedMultiheadAttention(make(), (0, 6))


# -- the pass on branch graphs ------------------------------------------------------


class AttnBranch(nn.Module):
    """ln -> attention, in the spellings and with the extra readers under test."""

    def __init__(self, form: str, **kw: Any) -> None:
        super().__init__()
        self.form, self.ln, self.attn = form, nn.LayerNorm(C), _mha(**kw)

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        h = self.ln(x)
        if self.form == "keywords":
            return self.attn(query=h, key=h, value=h, need_weights=False)[0]
        if self.form == "cross":  # keys and values from the context
            return self.attn(h, ctx, ctx)[0]
        if self.form == "weights_read":  # the weights do not depend on any slice
            out, weights = self.attn(h, h, h)
            return out * weights.mean()
        if self.form == "output_read_whole":  # a second reader of all C channels
            out = self.attn(h, h, h)
            return out[0] * torch.sigmoid(out[0].mean(-1, keepdim=True))
        pad = ctx[..., 0] > 1  # (batch, keys) or (keys, batch)
        pad = pad if self.attn.batch_first else pad.t()
        return self.attn(h, h, h, key_padding_mask=pad)[0]


def _padding_attention(mp: pytest.MonkeyPatch) -> None:
    """The pass as it was: attention fed a zero-padded input, narrowed after."""
    mp.setattr(restrict_module.Walk, "_attention_reads", lambda *a: False)
    mp.setattr(restrict_module, "attention_call", lambda node, root: None)


def _split(gm: fx.GraphModule, x: Tensor, ctx: Tensor) -> list:
    return list(split_branch(gm, (x, ctx), dim=-1, sizes=(C // 2, C - C // 2)))


def _called(gm: nn.Module, fn: Callable) -> bool:
    return any(n.target is fn for n in gm.graph.nodes)  # type: ignore[union-attr]


# form, kwargs, (in_sel sliced, out_sel sliced)
FORMS = [
    ("positional", {"batch_first": True}, (True, True)),
    ("keywords", {"batch_first": True}, (True, True)),
    ("positional", {"batch_first": False}, (True, True)),
    ("weights_read", {"batch_first": True}, (True, True)),
    ("cross", {"batch_first": True}, (False, True)),
    ("output_read_whole", {"batch_first": True}, (True, False)),
    ("positional", {"batch_first": True, "add_bias_kv": True}, (False, False)),
]


@pytest.mark.parametrize(("form", "kw", "expect"), FORMS)
def test_the_pass_slices_attention_where_it_can_and_pads_elsewhere(
    form: str, kw: dict, expect: tuple[bool, bool]
) -> None:
    gm = fx.symbolic_trace(AttnBranch(form, **kw).double().eval())
    x, ctx = torch.randn(N, L, C, dtype=F64), torch.randn(N, L, C, dtype=F64)
    with pytest.MonkeyPatch.context() as mp:
        _padding_attention(mp)
        before = _split(gm, x, ctx)
    c1 = C // 2
    for half, old, in_sel, out_sel in zip(
        _split(gm, x, ctx), before, ((c1, C), (0, c1)), ((0, c1), (c1, C)), strict=True
    ):
        assert half.method == "sliced", half.detail
        (attn,) = [
            m
            for m in half.module.modules()
            if isinstance(m, nn.MultiheadAttention | SlicedMultiheadAttention)
        ]
        got = (
            getattr(attn, "in_sel", None) == in_sel,
            getattr(attn, "out_sel", None) == out_sel,
        )
        assert got == expect, half.detail
        assert _called(half.module, pad_channels) != expect[0]
        assert _called(half.module, narrow_channels) != expect[1]
        # Slicing changes the cost, never the function.
        stream = x.narrow(2, in_sel[0], in_sel[1] - in_sel[0])
        with torch.no_grad():
            assert rel_err(half.module(stream, ctx), old.module(stream, ctx)) < 1e-12


# -- converted models ------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block on nn.MultiheadAttention with a padding mask."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, d: int = 16, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(3, d), nn.Linear(d, 2)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, pad)
        return self.head(x)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_converted_encoder_slices_attention_and_matches_storing_and_padding(
    dropout: float,
) -> None:
    torch.manual_seed(0)
    model = Encoder().double()
    for block in model.blocks:
        block.attn.dropout = dropout  # replayed in backward like any dropout
    x = torch.randn(2, 6, 3, dtype=F64)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, -2:] = True  # padding in the first sequence, passed on as context
    converted = revcompile.convert(model, (x, pad))
    with pytest.MonkeyPatch.context() as mp:
        _padding_attention(mp)
        padded = revcompile.convert(model, (x, pad))

    (stage,) = [
        m for m in converted.modules() if isinstance(m, revcompile.ReversibleStage)
    ]
    attention = stage.couplings[::2]  # attention and MLP couplings alternate
    for half in [h for c in attention for h in (c.F, c.G)]:
        kinds = [type(m) for m in half.modules()]
        assert SlicedMultiheadAttention in kinds and nn.MultiheadAttention not in kinds
        assert not _called(half, pad_channels) and not _called(half, narrow_channels)
    # Slicing changes the cost, not the function (nor the dropout draws).
    with torch.no_grad():
        torch.manual_seed(1)
        want = padded(x, pad)
        torch.manual_seed(1)
        assert rel_err(converted(x, pad), want) < 1e-10
    buf = io.BytesIO()
    torch.save(converted, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, pad), converted.eval()(x, pad))
    converted.train()
    n_params = [sum(p.numel() for p in m.parameters()) for m in (converted, padded)]
    assert n_params[0] < n_params[1]
    assert_matches_storing(converted, x, pad, rtol=1e-8)


def _attention_cost(model: nn.Module, converted: nn.Module) -> list[float]:
    """Parameters of each attention coupling's F + G over its ViT branch's."""

    def count(*modules: nn.Module) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    (stage,) = [
        m for m in converted.modules() if isinstance(m, revcompile.ReversibleStage)
    ]
    layers = list(model.encoder.layers)
    return [
        count(c.F, c.G) / count(layer.ln_1, layer.self_attention)
        for layer, c in zip(layers, stage.couplings[::2], strict=True)
    ]


def test_vit_attention_halves_cost_one_attention_branch() -> None:
    """F + G of ViT's attention branch hold its parameters once, not twice; the
    layers have vit_b_16's shapes (768 wide, 12 heads), two of them for speed."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=16,
        num_layers=2,
        num_heads=12,
        hidden_dim=768,
        mlp_dim=3072,
        num_classes=10,
    )
    x = torch.randn(2, 3, 32, 32)
    sliced = _attention_cost(model, revcompile.convert(model, (x,)))
    with pytest.MonkeyPatch.context() as mp:
        _padding_attention(mp)
        padded = _attention_cost(model, revcompile.convert(model, (x,)))
    # in_proj_bias is kept whole in both F and G: +0.08%.
    assert [round(r, 2) for r in sliced] == [1.00, 1.00], sliced
    assert [round(r, 2) for r in padded] == [2.00, 2.00], padded
