"""Residual block detection and planning on tiny inline models, one per pattern."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revcompile
from revcompile.passes.ir import GlueKind, Plan, ReasonKind


def conv(c: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
    )


def image(c: int = 8) -> tuple[torch.Tensor]:
    return (torch.randn(2, c, 8, 8),)


def kinds(plan: Plan) -> list[ReasonKind | None]:
    return [None if b.reason is None else b.reason.kind for b in plan.blocks]


class Identity(nn.Module):
    """The plainest residual block: x + f(x)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.f = conv(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def test_identity_block() -> None:
    plan = revcompile.analyze(Identity(), image())
    (block,) = plan.blocks
    assert block.eligible and block.stage == 0
    assert block.fork == "x" and block.skip == ()
    assert (block.channel_dim, block.channels, block.shape) == (1, 8, (2, 8, 8, 8))
    assert block.branch[-1] == "f_2" and "f_0" in block.branch
    (stage,) = plan.stages
    assert stage.split == (4, 4) and not stage.uneven and not stage.changes_function
    assert stage.bytes_after < stage.bytes_before
    assert plan.tracer == "fx"


class Projection(nn.Module):
    """A ResNet downsampling block: the shortcut is a strided 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(), conv(16))
        self.down = nn.Conv2d(8, 16, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x) + self.f(x)


def test_projection_shortcut_is_rejected_with_module_and_op() -> None:
    plan = revcompile.analyze(Projection(), image())
    assert kinds(plan) == [ReasonKind.PROJECTION_SHORTCUT]
    assert plan.blocks[0].reason is not None
    assert "down" in plan.blocks[0].reason.detail
    assert "stride 2" in plan.blocks[0].reason.detail
    assert plan.stages == ()


class PostJoinRelu(nn.Module):
    """torchvision's BasicBlock shape: relu(x + f(x)), twice."""

    def __init__(self) -> None:
        super().__init__()
        self.f1, self.f2, self.relu = conv(8), conv(8), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x + self.f1(x))
        return self.relu(x + self.f2(x))


def test_post_join_relu_is_absorbed_and_changes_the_function() -> None:
    plan = revcompile.analyze(PostJoinRelu(), image())
    (stage,) = plan.stages
    assert len(stage.blocks) == 2
    ((glue),) = stage.glue
    assert glue.kind is GlueKind.ACTIVATION and glue.op == "ReLU"
    assert stage.changes_function and "relu" in stage.function_changes[0]
    assert stage.output == plan.blocks[1].join  # the trailing relu stays outside


class IdentityOnSkip(nn.Module):
    """Identity modules, dropout p=0 and no-op casts on the skip path still count."""

    def __init__(self) -> None:
        super().__init__()
        self.skip, self.drop, self.f = nn.Identity(), nn.Dropout(0.0), conv(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.skip(x).contiguous().to(x.dtype)) + self.f(x)


def test_identity_glue_on_the_skip() -> None:
    plan = revcompile.analyze(IdentityOnSkip(), image())
    (block,) = plan.blocks
    assert block.eligible and block.fork == "x"
    assert block.skip == ("skip", "contiguous", "to", "drop")


class Inner(nn.Module):
    """Two residual blocks in a row."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Identity(), Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class Nested(nn.Module):
    """A chain of two residual blocks inside the branch of an outer one."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.inner, self.post = conv(8), Inner(), conv(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post(self.inner(self.pre(x)))


def test_nested_blocks_convert_with_the_outer_one() -> None:
    plan = revcompile.analyze(Nested(), image())
    by_path = {b.module_path: b for b in plan.blocks}
    assert set(by_path) == {"", "inner.a", "inner.b"}
    assert by_path[""].eligible and by_path[""].stage == 0
    for path in ("inner.a", "inner.b"):
        reason = by_path[path].reason
        assert reason is not None and reason.kind is ReasonKind.NESTED_IN_BRANCH


def test_a_dropped_outer_block_releases_the_nested_chain() -> None:
    """With min_blocks=2 the outer block alone is too short; the inner pair is not."""
    plan = revcompile.analyze(Nested(), image(), min_blocks=2)
    by_path = {b.module_path: b for b in plan.blocks}
    assert by_path[""].reason is not None
    assert by_path[""].reason.kind is ReasonKind.STAGE_TOO_SHORT
    (stage,) = plan.stages
    assert [by_path["inner.a"].join, by_path["inner.b"].join] == list(stage.blocks)


class SharedFork(nn.Module):
    """One value feeds two blocks: each converts, but they cannot chain."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.f1, self.f2 = conv(8), conv(8), conv(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return (h + self.f1(h)) * (h + self.f2(h))


def test_a_fork_read_by_two_blocks_gives_two_stages() -> None:
    plan = revcompile.analyze(SharedFork(), image())
    assert kinds(plan) == [None, None]
    assert [len(s.blocks) for s in plan.stages] == [1, 1]
    assert {s.input for s in plan.stages} == {"stem_2"}


class Parallel(nn.Module):
    """GPT-J style: attention and MLP read the same normed input, one residual sum."""

    def __init__(self, c: int = 16, stream_first: bool = False) -> None:
        super().__init__()
        self.norm, self.attn, self.mlp = (
            nn.LayerNorm(c),
            nn.Linear(c, c),
            nn.Linear(c, c),
        )
        self.stream_first = stream_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.stream_first:
            return x + self.attn(h) + self.mlp(h)
        return self.attn(h) + self.mlp(h) + x


class RepVGG(nn.Module):
    """RepVGG's training-time block: relu(conv3(x) + conv1(x) + x)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv3, self.conv1 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv3(x) + self.conv1(x) + x)


def test_a_sum_of_two_paths_and_the_stream_is_one_block() -> None:
    for model, x in ((Parallel(), torch.randn(2, 4, 16)), (RepVGG(), image()[0])):
        plan = revcompile.analyze(model, (x,))
        (block,) = plan.blocks  # the inner add is part of the branch, not a block
        assert block.eligible and block.fork == "x", type(model).__name__
        assert block.branch[-1] == "add"  # the branch's value: the two paths' sum


def test_a_sum_that_adds_the_stream_first_is_one_rejected_block() -> None:
    plan = revcompile.analyze(Parallel(stream_first=True), (torch.randn(2, 4, 16),))
    assert kinds(plan) == [ReasonKind.STREAM_ADDED_FIRST]


class Masked(nn.Module):
    """A token block whose branch reads a boolean padding mask."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.unsqueeze(-1).to(x.dtype)
        return x + self.proj(self.norm(x)) * keep


def test_a_mask_read_by_the_branch_is_context() -> None:
    x, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    plan = revcompile.analyze(Masked(), (x, mask))
    (block,) = plan.blocks
    assert block.eligible and block.context == ("to",)
    assert (block.channel_dim, block.channels) == (2, 16)
    assert plan.stages[0].context == ("to",)
    assert dict(plan.inputs) == {"x": (2, 5, 16), "mask": (2, 5)}


class ReadsEncoder(nn.Module):
    """A U-Net style branch that also reads an earlier feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.mid, self.f, self.g = conv(8), conv(8), conv(8), conv(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.enc(x)
        b = self.mid(a)
        return b + self.f(b) * self.g(a)


def test_a_branch_reading_another_activation_is_rejected() -> None:
    plan = revcompile.analyze(ReadsEncoder(), image())
    assert kinds(plan) == [ReasonKind.BRANCH_READS_ACTIVATIONS]
    assert plan.blocks[0].reason is not None
    assert "g" in plan.blocks[0].reason.detail


class Escapes(nn.Module):
    """The block's hidden activation is also returned."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = conv(8), conv(8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.f(x)
        return x + self.g(h), h


def test_a_branch_value_read_after_the_block_is_rejected() -> None:
    plan = revcompile.analyze(Escapes(), image())
    assert kinds(plan) == [ReasonKind.BRANCH_VALUE_ESCAPES]


class InPlaceReluOnStream(nn.Module):
    """The branch starts with an in-place ReLU on the stream the skip then reads."""

    def __init__(self) -> None:
        super().__init__()
        self.relu, self.f = nn.ReLU(inplace=True), conv(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2
        return h + self.f(self.relu(h))


class InPlaceAdd(nn.Module):
    """`h.add_(f(h))`, then `h` is read again under its old name."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.f = conv(8), conv(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h.add_(self.f(h))
        return h * 2


class InPlaceOnInput(nn.Module):
    """`x += f(x)` on the caller's own tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.f = conv(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x += self.f(x)
        return x


def test_an_in_place_op_on_the_stream_is_rejected() -> None:
    plan = revcompile.analyze(InPlaceReluOnStream(), image())
    assert kinds(plan) == [ReasonKind.STREAM_MUTATED_IN_PLACE]
    assert plan.blocks[0].reason is not None
    assert "relu" in plan.blocks[0].reason.detail


def test_in_place_add_on_the_stream() -> None:
    """An in-place join is fine unless the overwritten stream is seen again."""
    plan = revcompile.analyze(InPlaceAdd(), image())
    assert kinds(plan) == [ReasonKind.STREAM_MUTATED_IN_PLACE]
    # torch.export follows the tensor, so `h * 2` reads the join: nothing stale.
    plan = revcompile.analyze(InPlaceAdd(), image(), tracer="export")
    assert kinds(plan) == [None] and plan.blocks[0].join_in_place
    # `x += f(x)` on the input overwrites the caller's tensor.
    plan = revcompile.analyze(InPlaceOnInput(), image(), tracer="export")
    assert kinds(plan) == [ReasonKind.STREAM_MUTATED_IN_PLACE]
    assert plan.blocks[0].reason is not None
    assert "caller's input" in plan.blocks[0].reason.detail


def test_no_residuals() -> None:
    plan = revcompile.analyze(nn.Sequential(conv(8), conv(8)), image())
    assert plan.blocks == () and plan.stages == ()
    assert plan.summary() == "no residual blocks found; nothing converts"


class Checked(nn.Module):
    """Data-dependent control flow: neither fx nor torch.export can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.f = conv(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x) if x.sum() > 0 else -self.f(x)


class Untraceable(nn.Module):
    """Two residual blocks around untraceable submodules."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Checked(), Checked()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return x


def test_untraceable_submodule_names_the_module_and_the_fix() -> None:
    with pytest.raises(revcompile.TraceError, match=r"blocks\.0") as info:
        revcompile.analyze(Untraceable(), image())
    assert "leaf_modules" in str(info.value)
    assert isinstance(info.value, RuntimeError)
    # A model in training mode also hears about training-only data-dependent code.
    assert "training-only" in str(info.value)
    with pytest.raises(revcompile.TraceError) as info:
        revcompile.analyze(Untraceable().eval(), image())
    assert "training-only" not in str(info.value)


@pytest.mark.parametrize("leaf", [Checked, "blocks.0", "instance"])
def test_leaf_modules_fix_an_untraceable_submodule(leaf: object) -> None:
    model = Untraceable()
    leaves = [Checked] if leaf is Checked else ["blocks.0", model.blocks[1]]
    if leaf == "instance":
        leaves = [model.blocks[0], model.blocks[1]]
    plan = revcompile.analyze(model, image(), leaf_modules=leaves)
    assert kinds(plan) == [None, None] and [len(s.blocks) for s in plan.stages] == [2]


class Gelu(nn.Module):
    """An MLP block with a hand-written tanh GELU (`x + 0.044715 * x**3` inside)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = 0.5 * h * (1 + torch.tanh(0.79788456 * (h + 0.044715 * h**3)))
        return x + self.fc2(h)


def test_an_add_without_parameters_in_its_branch_is_not_a_block() -> None:
    plan = revcompile.analyze(Gelu(), (torch.randn(2, 4, 16),))
    (block,) = plan.blocks
    assert block.eligible and block.module_path == ""


class Rotary(nn.Module):
    """Llama-style rotary embedding on a projection, then a residual add."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(c, c), nn.Linear(c, c)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, c, 2) / c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.arange(x.shape[1], dtype=x.dtype)
        freqs = torch.outer(t, self.inv_freq)
        table = torch.cat([freqs, freqs], -1)
        cos, sin = table.cos(), table.sin()
        q = self.q(x)
        half = torch.cat([-q[..., 8:], q[..., :8]], dim=-1)
        return x + self.o(q * cos + half * sin)


def test_rotary_tables_are_context_and_the_rotation_is_no_block() -> None:
    plan = revcompile.analyze(Rotary(), (torch.randn(2, 4, 16),))
    (block,) = plan.blocks
    assert block.eligible
    assert set(block.context) == {"cos", "sin"}


class PostNorm(nn.Module):
    """BERT-style post-norm: norm(x + f(x)), twice."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.f1, self.f2 = nn.Linear(c, c), nn.Linear(c, c)
        self.n1, self.n2 = nn.LayerNorm(c), nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.n1(x + self.f1(x))
        return self.n2(x + self.f2(x))


def test_post_norm_chains_through_an_absorbed_norm() -> None:
    plan = revcompile.analyze(PostNorm(), (torch.randn(2, 4, 16),))
    (stage,) = plan.stages
    assert [g.kind for g in stage.glue] == [GlueKind.NORM]
    assert stage.changes_function and stage.channel_dim == 2


class DropPathBlock(nn.Module):
    """ConvNeXt style: layer scale, functional dropout and stochastic depth."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.f = conv(c)
        self.scale = nn.Parameter(torch.full((c, 1, 1), 1e-6))
        self.drop_path = StochasticDepth(0.2, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(self.f(x), 0.1, self.training)
        return x + self.drop_path(self.scale * h)


def test_stochastic_ops_are_recorded_and_follow_the_mode() -> None:
    model = DropPathBlock().train()
    plan = revcompile.analyze(model, image())
    (block,) = plan.blocks
    assert block.eligible and len(block.stochastic) == 2
    assert plan.training
    # Neither dropout kept training=True from the trace: eval() switches both off.
    converted = revcompile.convert(model, image()).eval()
    x = torch.randn(2, 8, 8, 8)
    assert torch.equal(converted(x), converted(x))


class InlineDropPath(nn.Module):
    """timm-style drop path written inline: a mask from ``new_empty().bernoulli_()``."""

    def __init__(self) -> None:
        super().__init__()
        self.f = conv(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.f(x)
        keep = h.new_empty(h.shape[0], 1, 1, 1).bernoulli_(0.9)
        return x + h * keep / 0.9


def test_an_inline_random_mask_is_context_and_stochastic() -> None:
    plan = revcompile.analyze(InlineDropPath(), image())
    (block,) = plan.blocks
    assert block.eligible and block.context == ("bernoulli_",)
    assert block.stochastic == ("bernoulli_",)


def test_odd_channel_counts_split_unevenly() -> None:
    plan = revcompile.analyze(Identity(7), (torch.randn(2, 7, 4, 4),))
    (stage,) = plan.stages
    assert stage.split == (3, 4) and stage.uneven


def test_min_blocks_rejects_short_stages() -> None:
    plan = revcompile.analyze(PostJoinRelu(), image(), min_blocks=3)
    assert kinds(plan) == [ReasonKind.STAGE_TOO_SHORT] * 2 and plan.stages == ()


def test_both_tracers_agree() -> None:
    """The ATen graph of torch.export gives the same plan as fx's graph."""
    for model in (PostJoinRelu(), Nested(), IdentityOnSkip(), Projection()):
        fx_plan = revcompile.analyze(model, image())
        ex_plan = revcompile.analyze(model, image(), tracer="export")
        assert ex_plan.tracer == "export"
        assert kinds(ex_plan) == kinds(fx_plan), type(model).__name__
        assert [len(s.blocks) for s in ex_plan.stages] == [
            len(s.blocks) for s in fx_plan.stages
        ]


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: a layer norm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class NormFirst(nn.Module):
    """FocalNet's block opens with LayerNorm2d, then a 1x1 conv."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.norm, self.proj = LayerNorm2d(c), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.norm(x))


@pytest.mark.parametrize("permute", ["permute", "transpose"])
def test_a_norm_over_permuted_channels_splits_the_channels(permute: str) -> None:
    """At an example where W == C, the last dim of the permuted map is the stream's
    dim 1: that is the split, and other sizes convert and run."""
    block = NormFirst()
    if permute == "transpose":  # the same norm written with two transposes
        block.norm.forward = lambda x: F.layer_norm(  # type: ignore[method-assign]
            x.transpose(1, 3), (8,), block.norm.weight, block.norm.bias
        ).transpose(1, 3)
    model = nn.Sequential(block, NormFirst())
    plan = revcompile.analyze(model, image())
    assert [(b.channel_dim, b.channels) for b in plan.blocks] == [(1, 8), (1, 8)]
    converted = revcompile.convert(model, image())
    assert converted(torch.randn(3, 8, 5, 7)).shape == (3, 8, 5, 7)
