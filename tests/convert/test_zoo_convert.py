"""The model zoo, converted: structure, a training step, float64 gradients equal to
storing mode, the user's model unchanged, deterministic eval."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn

import revcompile
from tests.models import NanoGPT, PreActResNet

F64 = torch.float64
RTOL = 1e-8


def _vision(name: str, size: int = 32, **kw: Any) -> Callable[[], tuple]:
    def make() -> tuple[nn.Module, tuple, dict]:
        model = getattr(torchvision.models, name)(num_classes=10, **kw)
        for m in model.modules():
            # torchvision zero-initialises ViT's head: every body gradient would be
            # 0 and the comparison below would prove nothing.
            if isinstance(m, nn.Linear) and not m.weight.any():
                nn.init.normal_(m.weight, std=0.02)
        return model, (torch.randn(2, 3, size, size),), {}

    return make


def _gpt2() -> tuple[nn.Module, tuple, dict]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=4, n_embd=32, n_head=4, vocab_size=64, n_positions=32
    )
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, -3:] = 0  # padding in the first sequence
    return transformers.GPT2Model(cfg), (), {"input_ids": ids, "attention_mask": mask}


def _llama() -> tuple[nn.Module, tuple, dict]:
    """Traced with torch.export, whose `.to()` casts (RMSNorm) leave metadata checks
    that once kept the replaced blocks running (Note [Checks keep dead code alive])."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    return transformers.LlamaModel(cfg), (), {"input_ids": ids, "attention_mask": mask}


def _bert() -> tuple[nn.Module, tuple, dict]:
    """Post-norm: every join's LayerNorm moves into the next branch."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, -2:] = 0
    return transformers.BertModel(cfg), (), {"input_ids": ids, "attention_mask": mask}


MODELS = {
    # 64 px: at 32 px layer4 is 1x1 and train-mode batch norm over 2 values per
    # channel is ill-conditioned (gradients ~1e13) whatever the conversion.
    "resnet18": (_vision("resnet18", 64), [2, 1, 1, 1]),
    "resnet50": (_vision("resnet50", 64), [2, 3, 5, 2]),
    "mobilenet_v2": (_vision("mobilenet_v2"), [1, 2, 3, 2, 2]),
    "convnext_tiny": (_vision("convnext_tiny"), [3, 3, 9, 3]),
    "vit_b_16": (_vision("vit_b_16", image_size=32), [24]),
    "gpt2": (_gpt2, [8]),
    "llama": (_llama, [4]),
    "bert": (_bert, [4]),
    # Squeeze-and-excitation branches, grouped convs, shifted-window attention.
    "efficientnet_b0": (_vision("efficientnet_b0", 64), [1, 1, 2, 2, 3]),
    "regnet_y_400mf": (_vision("regnet_y_400mf", 64), [2, 5, 5]),
    "swin_t": (_vision("swin_t", 64), [4, 4, 12, 4]),
    # A parent module (attention) survives for its position-bias MLP, read outside
    # the stage; its logit_scale, read only inside, must not stay behind.
    "swin_v2_t": (_vision("swin_v2_t", 64), [4, 4, 12, 4]),
    "preact_resnet": (
        lambda: (PreActResNet(depth=3), (torch.randn(2, 3, 16, 16),), {}),
        [3, 3],
    ),
    "nanogpt": (lambda: (NanoGPT(layers=3), (torch.randint(0, 64, (2, 16)),), {}), [6]),
}


def _output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple | list):
        return out[0]
    return out.last_hidden_state  # transformers' ModelOutput


def _step(model: nn.Module, args: tuple, kwargs: dict, storing: bool) -> tuple:
    """Loss, parameter gradients and floating input gradients of one step."""
    args = tuple(a.detach().clone().requires_grad_(a.is_floating_point()) for a in args)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # same dropout / drop-path draws in both modes
    if storing:
        with revcompile.storing_activations():
            out = _output(model(*args, **kwargs))
    else:
        out = _output(model(*args, **kwargs))
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    loss = (out * weight).sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, [a.grad for a in args if a.is_floating_point()]


def _close(a: Tensor, b: Tensor, scale: float) -> bool:
    """Relative to the tensor, floored at a thousandth of the largest gradient: some
    true gradients are 0 (a bias feeding a train-mode batch norm) and only noise."""
    return (a - b).abs().max().item() <= RTOL * max(b.abs().max().item(), 1e-3 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_zoo_model_converts_and_matches_storing_mode(name: str) -> None:
    make, expected_stages = MODELS[name]
    torch.manual_seed(0)
    model, args, kwargs = make()
    model = model.double()
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    state = copy.deepcopy(model.state_dict())

    converted = revcompile.convert(model, args or kwargs)

    # The user's model is untouched.
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    stages = [
        m for m in converted.modules() if isinstance(m, revcompile.ReversibleStage)
    ]
    assert len(stages) == len(converted.revcompile_plan.stages)
    assert [len(s.couplings) for s in stages] == expected_stages

    loss_r, grads_r, inputs_r = _step(converted, args, kwargs, storing=False)
    loss_s, grads_s, inputs_s = _step(converted, args, kwargs, storing=True)
    assert grads_r.keys() == grads_s.keys() and grads_s
    # Every parameter the original trains is used: leftovers of replaced layers
    # would break DDP. (BERT's pooler gets no gradient from this loss in either.)
    _, grads_o, _ = _step(model, args, kwargs, storing=False)
    unused_o = {n for n, _ in model.named_parameters()} - grads_o.keys()
    assert {n for n, _ in converted.named_parameters()} - grads_r.keys() <= unused_o
    scale = max(g.abs().max().item() for g in grads_s.values())
    assert abs(loss_r - loss_s) <= RTOL * abs(loss_s)
    for n in grads_s:
        assert _close(grads_r[n], grads_s[n], scale), n
    for a, b in zip(inputs_r, inputs_s, strict=True):
        assert _close(a, b, b.abs().max().item())

    # A training step changes the parameters; eval is deterministic.
    opt = torch.optim.SGD(converted.parameters(), lr=1e-3)
    opt.step()
    converted.eval()
    with torch.no_grad():
        assert torch.equal(
            _output(converted(*args, **kwargs)), _output(converted(*args, **kwargs))
        )
