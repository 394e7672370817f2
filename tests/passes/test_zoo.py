"""The analysis on real models: torchvision and transformers, built without weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

import revcompile
from revcompile.passes.ir import GlueKind, Plan, ReasonKind


def stage_sizes(plan: Plan) -> list[int]:
    return [len(s.blocks) for s in plan.stages]


def rejected(plan: Plan) -> list[ReasonKind]:
    return [b.reason.kind for b in plan.blocks if b.reason is not None]


def test_resnet18() -> None:
    plan = revcompile.analyze(torchvision.models.resnet18())
    assert len(plan.blocks) == 8
    assert len(plan.converted) == 5 and stage_sizes(plan) == [2, 1, 1, 1]
    assert rejected(plan) == [ReasonKind.PROJECTION_SHORTCUT] * 3
    assert [s.channels for s in plan.stages] == [64, 128, 256, 512]
    assert {s.channel_dim for s in plan.stages} == {1}
    (glue,) = plan.stages[0].glue
    assert glue.kind is GlueKind.ACTIVATION and plan.stages[0].changes_function
    assert not plan.stages[1].changes_function  # one block: no relu in between
    assert plan.inputs == (("x", (2, 3, 64, 64)),)
    assert 0 < plan.fraction_saved < 1


@pytest.mark.slow
def test_resnet18_through_torch_export_gives_the_same_plan() -> None:
    plan = revcompile.analyze(torchvision.models.resnet18(), tracer="export")
    assert plan.tracer == "export" and stage_sizes(plan) == [2, 1, 1, 1]
    assert rejected(plan) == [ReasonKind.PROJECTION_SHORTCUT] * 3
    assert any("dynamic" in note for note in plan.notes)
    assert any("batch norm in train mode" in note for note in plan.notes)


@pytest.mark.slow
def test_resnet50() -> None:
    plan = revcompile.analyze(torchvision.models.resnet50())
    assert len(plan.blocks) == 16 and len(plan.converted) == 12
    assert stage_sizes(plan) == [2, 3, 5, 2]
    assert rejected(plan) == [ReasonKind.PROJECTION_SHORTCUT] * 4


@pytest.mark.slow
def test_mobilenet_v2() -> None:
    plan = revcompile.analyze(torchvision.models.mobilenet_v2())
    assert len(plan.blocks) == 10 and len(plan.converted) == 10
    # The inverted residuals between the downsampling blocks: 24, 32, 64, 96, 160.
    assert stage_sizes(plan) == [1, 2, 3, 2, 2]
    assert [s.channels for s in plan.stages] == [24, 32, 64, 96, 160]


@pytest.mark.slow
def test_vit_b_16_small_image() -> None:
    model = torchvision.models.vit_b_16(image_size=32)
    plan = revcompile.analyze(model)
    assert plan.inputs == (("x", (2, 3, 32, 32)),)  # the model's own image_size
    assert len(plan.blocks) == 24 and stage_sizes(plan) == [24]
    (stage,) = plan.stages
    assert (stage.channel_dim, stage.channels, stage.split) == (2, 768, (384, 384))
    assert stage.glue == () and not stage.changes_function
    assert stage.shape_reads  # the encoder's `input.dim() == 3` asserts


@pytest.mark.slow
def test_convnext_tiny_records_stochastic_depth() -> None:
    model = torchvision.models.convnext_tiny(stochastic_depth_prob=0.1)
    plan = revcompile.analyze(model)
    assert stage_sizes(plan) == [3, 3, 9, 3]
    assert plan.blocks[0].stochastic == ()  # its drop-path probability is 0
    assert all(len(b.stochastic) == 1 for b in plan.blocks[1:])


@pytest.mark.slow
def test_gpt2_model_with_attention_mask() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=4, n_embd=32, n_head=4, n_positions=32, vocab_size=64
    )
    model = transformers.GPT2Model(config)
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    plan = revcompile.analyze(model, {"input_ids": ids, "attention_mask": mask})
    assert plan.tracer == "export"  # transformers models defeat symbolic tracing
    assert len(plan.blocks) == 8 and len(plan.converted) == 8
    assert stage_sizes(plan) == [8]
    (stage,) = plan.stages
    assert stage.channel_dim == 2 and stage.channels == 32
    (mask_node,) = stage.context
    assert all(b.context == (mask_node,) for b in plan.blocks[::2])  # attention
    assert all(b.context == () for b in plan.blocks[1::2])  # MLP
    assert all(b.stochastic for b in plan.blocks)  # residual and attention dropout
    assert dict(plan.inputs) == {"input_ids": (2, 8), "attention_mask": (2, 8)}
    assert model.config.use_cache  # only the traced copy gave up its cache
    assert any("use_cache" in n for n in plan.notes)


def test_the_users_model_is_never_touched() -> None:
    model = torchvision.models.resnet18().train()
    before = copy.deepcopy(model.state_dict())
    revcompile.analyze(model)
    revcompile.analyze(model, tracer="export")
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_to_dict_is_json_with_one_entry_per_add() -> None:
    plan = revcompile.analyze(torchvision.models.resnet18(), min_blocks=2)
    data = json.loads(json.dumps(plan.to_dict()))
    assert len(data["blocks"]) == 8 and len(data["stages"]) == 1
    for entry in data["blocks"]:
        assert {"module_path", "eligible", "reason", "stage"} <= entry.keys()
    assert data["stages"][0]["blocks"] == 2 and data["stages"][0]["channels"] == 64
    reasons = [b["reason"]["kind"] for b in data["blocks"] if not b["eligible"]]
    assert sorted(set(reasons)) == ["PROJECTION_SHORTCUT", "STAGE_TOO_SHORT"]
    assert data["summary"] == plan.summary()


def test_inputs_cannot_be_inferred_without_a_first_layer() -> None:
    class Head(nn.Module):
        """No layer to read an input shape from."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    with pytest.raises(revcompile.TraceError, match="example_inputs="):
        revcompile.analyze(Head())


def test_bad_options_are_rejected() -> None:
    with pytest.raises(revcompile.ConversionError, match="min_blocks"):
        revcompile.analyze(nn.Identity(), (torch.ones(2, 2),), min_blocks=0)
    with pytest.raises(revcompile.ConversionError, match="tracer"):
        revcompile.analyze(nn.Identity(), (torch.ones(2, 2),), tracer="jit")


@pytest.mark.slow
def test_bert_post_norm_chains_through_its_layer_norms() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    model = transformers.BertModel(config)
    plan = revcompile.analyze(model, {"input_ids": ids, "attention_mask": mask})
    assert len(plan.blocks) == 4 and stage_sizes(plan) == [4]
    (stage,) = plan.stages
    assert [g.kind for g in stage.glue] == [GlueKind.NORM] * 3
    assert stage.changes_function and stage.context  # the extended attention mask


@pytest.mark.slow
def test_llama_rotary_tables_are_context() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
    )
    ids = torch.randint(0, 64, (2, 8))
    plan = revcompile.analyze(transformers.LlamaModel(config), {"input_ids": ids})
    assert len(plan.blocks) == 4 and stage_sizes(plan) == [4]
    attention = plan.blocks[0]
    assert len(attention.context) >= 2  # cos and sin (and the causal mask)
    assert plan.blocks[1].context == ()
