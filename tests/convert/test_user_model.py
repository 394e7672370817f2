"""The converted model is the user's model: same class, attributes, casts, pickling,
other batch sizes, and a clear error where a traced call cannot be replayed."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F

import revcompile
from revcompile.passes.ir import ReasonKind
from revcompile.passes.trace import trace
from revcompile.runtime.scope import TracedForward
from tests.models import PreActResNet

transformers = pytest.importorskip("transformers")


def _stages(m: nn.Module) -> list[revcompile.ReversibleStage]:
    return [s for s in m.modules() if isinstance(s, revcompile.ReversibleStage)]


def _llama(causal: bool = True) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    cls = transformers.LlamaForCausalLM if causal else transformers.LlamaModel
    return cls(cfg)


def _tokens(batch: int = 2, length: int = 8) -> dict[str, Tensor]:
    ids = torch.randint(0, 64, (batch, length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_a_torchvision_model_keeps_its_class_and_its_head_can_be_replaced() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    converted = revcompile.convert(model, (torch.randn(2, 3, 64, 64),))
    assert type(converted) is torchvision.models.ResNet
    # Only the submodules that enclose stages were rewritten, and kept their class.
    assert type(converted.layer1) is nn.Sequential
    assert isinstance(converted.layer1.forward, TracedForward)
    assert not isinstance(converted.fc.forward, TracedForward)
    scopes = [s.path for s in converted.revcompile_plan.scopes]
    # The projection blocks are checkpointed (memory_budget=None): each is its own
    # scope beside its stage's; stem and head stay the user's eager code.
    assert scopes == ["layer1", *(f"layer{k}.{i}" for k in (2, 3, 4) for i in (0, 1))]
    converted.fc = nn.Linear(512, 5)
    assert converted(torch.randn(3, 3, 64, 64)).shape == (3, 5)


def test_a_language_model_keeps_config_loss_and_generate() -> None:
    model = _llama()
    converted = revcompile.convert(model, _tokens())
    assert type(converted) is type(model) and converted.config is not None
    assert type(converted.model) is transformers.LlamaModel
    assert len(_stages(converted)) == 1
    batch = _tokens(3, 10)
    # `labels` was not in the example: the loss still works, and so does no loss.
    loss = converted(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss) and converted(**batch).loss is None
    # Greedy decoding equals the converted model's own forward, token by token,
    # with and without padding.
    _assert_generate_is_greedy_forward(converted, batch["input_ids"])


def _assert_generate_is_greedy_forward(converted: nn.Module, ids: Tensor) -> None:
    """Greedy ``generate`` (no mask, a mask without and with left padding) equals
    greedy decoding with the converted model's own forward."""
    converted.eval()
    padded = torch.ones_like(ids)
    padded[0, :2] = padded[-1, 0] = 0
    for mask in (None, torch.ones_like(ids), padded):
        extra = {} if mask is None else {"attention_mask": mask}
        out = converted.generate(ids, max_new_tokens=3, do_sample=False, **extra)
        seq, m = ids, mask
        for _ in range(3):
            with torch.no_grad():
                logits = converted(input_ids=seq, attention_mask=m).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], 1)
            m = None if m is None else torch.cat([m, torch.ones_like(token)], 1)
        assert torch.equal(out, seq)


def test_a_mixture_of_experts_decoder_generates() -> None:
    # torch.export writes the experts' ``batch * seq`` product in another order for
    # generate's call (position_ids given) than for the example's: still one stage.
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    example = _tokens()
    example["attention_mask"][1, -2:] = 0
    converted = revcompile.convert(model, example)
    assert len(_stages(converted)) == 1
    assert not [n for n in converted.revcompile_plan.notes if "will not run" in n]
    _assert_generate_is_greedy_forward(converted, _tokens(3, 6)["input_ids"])


def test_a_call_convert_traced_but_could_not_add_is_refused_with_why(
    monkeypatch,
) -> None:
    from revcompile import api

    monkeypatch.setattr(api, "add_variant", lambda *_: "a reason of the test's")
    converted = revcompile.convert(_llama(), _tokens()).eval()
    notes = converted.revcompile_plan.notes
    assert any("will not run: a reason of the test's" in n for n in notes)
    ids = _tokens(1, 6)["input_ids"]
    with pytest.raises(revcompile.RevCompileError, match="a reason of the test's"):
        converted.generate(ids, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_an_exported_graph_computes_what_the_original_does_under_a_cast(
    dtype: torch.dtype,
) -> None:
    """Note [Dtypes that follow the model]: Llama keeps float32 islands (RMSNorm,
    rotary tables, softmax) and casts back to the model's dtype."""
    model = _llama(causal=False)
    batch = _tokens()
    traced = trace(model, batch, tracer="export")
    assert traced.dtype is torch.float32
    gm = copy.deepcopy(traced.gm).to(dtype)
    original = copy.deepcopy(model).to(dtype)
    spec = traced.out_spec
    assert spec is not None
    out = torch.utils._pytree.tree_unflatten(list(gm(*traced.values)), spec)
    expected = original(**batch).last_hidden_state
    assert out.last_hidden_state.dtype == dtype
    assert torch.equal(out.last_hidden_state, expected)


def test_a_converted_exported_model_trains_after_each_cast() -> None:
    converted = revcompile.convert(_llama(), _tokens())
    batch = _tokens()
    reference = converted(**batch).logits
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        cast = copy.deepcopy(converted).to(dtype)
        logits = cast(**batch).logits
        assert logits.dtype == dtype
        assert (logits.double() - reference.double()).abs().max() < 0.05
        logits.float().square().mean().backward()
        assert all(
            p.grad is not None and torch.isfinite(p.grad).all()
            for p in cast.parameters()
            if p.requires_grad
        )


class RolledBranch(nn.Module):
    """``x + conv(roll(x))`` along channels: no slice follows a roll, so F and G
    zero-pad into the branch (runtime helpers that unpickling must keep whole)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bn(self.conv(torch.roll(x, 1, dims=1)))


def test_save_load_and_deepcopy_with_zero_padded_branches() -> None:
    model = nn.Sequential(RolledBranch(), RolledBranch(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 8, 6, 6)
    converted = revcompile.convert(model, (x,)).eval()
    details = [d for b in converted.revcompile_builds for d in b.details]
    assert all("zero-padded" in d for d in details), details
    buf = io.BytesIO()
    torch.save(converted, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        expected = converted(x)
        assert torch.equal(loaded(x), expected)
        assert torch.equal(copy.deepcopy(converted)(x), expected)


def test_state_dict_names_of_kept_layers_do_not_change() -> None:
    model = PreActResNet(depth=2)
    converted = revcompile.convert(model, (torch.randn(2, 3, 8, 8),))
    plan = converted.revcompile_plan
    assert [b.module_path for b in plan.blocks if b.policy.value == "checkpoint"] == [
        "down"
    ]
    stored = {"stem.weight", "head.weight", "bn.running_mean"}
    assert stored <= converted.state_dict().keys()
    stored = revcompile.convert(model, memory_budget=1.0).state_dict().keys()
    assert {"stem.weight", "down.conv1.weight", "head.weight"} <= stored
    converted.load_state_dict(revcompile.convert(model).state_dict())


def test_an_example_batch_of_one() -> None:
    """torch.export would specialise a batch of one; batch norm cannot train on it."""
    converted = revcompile.convert(_llama(), _tokens(batch=1))
    assert any("batch of 1" in n for n in converted.revcompile_plan.notes)
    for batch in (1, 3):
        assert converted(**_tokens(batch, 5)).logits.shape == (batch, 5, 64)
    resnet = revcompile.convert(PreActResNet(depth=2), (torch.randn(1, 3, 8, 8),))
    resnet(torch.randn(4, 3, 8, 8)).sum().backward()


class Gated(nn.Module):
    """A stage inside a module whose own forward branches on data: no trace of the
    model exists, its stages convert all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.body = PreActResNet(depth=2)

    def forward(self, x: Tensor, scale: bool = False) -> Tensor:
        if x.mean() > 100:  # data-dependent Python: fx and export both refuse it
            x = x / 100
        return self.body(x * 2 if scale else x)


def test_code_no_tracer_handles_stays_eager_and_the_stages_below_convert() -> None:
    model = Gated()
    converted = revcompile.convert(model, (torch.randn(2, 3, 8, 8),))
    assert type(converted) is Gated
    assert not isinstance(converted.forward, TracedForward)
    assert len(_stages(converted)) == 2
    assert any("was not traced" in n for n in converted.revcompile_plan.notes)
    converted(torch.randn(2, 3, 8, 8), scale=True).sum().backward()


class TwoWays(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def forward(self, x: Tensor, doubled: bool = False) -> Tensor:
        return self.inner(x, doubled=doubled)


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = RolledBranch(), RolledBranch()

    def forward(self, x: Tensor, doubled: bool = False) -> Tensor:
        x = self.b(self.a(x))
        return x * 2 if doubled else x


def test_a_call_unlike_the_traced_one_is_refused_with_the_argument() -> None:
    converted = revcompile.convert(TwoWays(), (torch.randn(2, 8, 4, 4),))
    assert [s.path for s in converted.revcompile_plan.scopes] == ["inner"]
    x = torch.randn(2, 8, 4, 4)
    converted(x)
    with pytest.raises(revcompile.RevCompileError, match=r"\['doubled'\] was False"):
        converted(x, doubled=True)


def test_a_stage_whose_rewrite_fails_stays_with_a_reason(monkeypatch) -> None:
    from revcompile.passes import build as rewrite_pass

    real = rewrite_pass.split_branch
    calls = []

    def flaky(*args, **kwargs):  # the first stage's first block fails
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(rewrite_pass, "split_branch", flaky)
    model = PreActResNet(depth=2)
    converted = revcompile.convert(model, (torch.randn(2, 3, 8, 8),))
    plan = converted.revcompile_plan
    failed = [b for b in plan.blocks if b.reason is not None and b.reason.kind is
              ReasonKind.REWRITE_FAILED]  # fmt: skip
    assert len(failed) == 2 and "RuntimeError: boom" in failed[0].reason.detail
    assert len(plan.stages) == len(_stages(converted)) == 1
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(
        converted.stage1(model.stem(x)), model.stage1(model.stem(x))
    )


def test_only_revcompile_errors_leave_convert() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: Tensor) -> Tensor:
            raise KeyError("the model's own bug")

    with pytest.raises(revcompile.TraceError, match="does not run on the example"):
        revcompile.convert(Broken(), (torch.randn(2, 3, 4, 4),))


def test_inplace_stream_after_a_stage_and_functional_dropout() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(RolledBranch() for _ in range(2))

        def forward(self, x: Tensor) -> Tensor:
            for block in self.blocks:
                x = F.dropout(block(x), 0.5, self.training)
            return F.relu(x, inplace=True)

    converted = revcompile.convert(Net(), (torch.randn(2, 8, 4, 4),)).eval()
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(converted(x), converted(x))
