"""The zoo the journey runs on, enumerated from the libraries, not picked by hand.

- torchvision: every classification builder (`torchvision.models.list_models`).
- timm: the smallest model (by parameter count, measured on the meta device) of every
  timm module (`timm.list_modules`: one module per architecture family).
- Hugging Face: a tiny config of every architecture of the causal-LM, masked-LM
  (encoder), image-classification and CTC (speech) mappings whose config shrinks
  with the generic sizes below, every k-th per mapping (`EVERY`); decoders with
  their LM head, and some also without it.

Every model is built with random weights (nothing is downloaded) at a small input:
the smallest of 32, 64, 96, 128, 160, 224, 299 pixels at which the original
runs (64 for the float64 gradients where the model takes it), 8 tokens for text,
1600 samples for speech.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

Inputs = tuple[tuple[Tensor, ...], dict[str, Tensor]]
CACHE = Path(__file__).with_name("zoo_timm.json")  # the meta-device scan (~5 min)
HF_CACHE = Path(__file__).with_name("zoo_hf.json")


@dataclass(frozen=True)
class Entry:
    name: str
    """``zoo:model``: ``torchvision:resnet18``, ``timm:resnet10t``, ``hf:llama``."""
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], Inputs]
    """(batch, length) -> positional and keyword inputs; length is ignored by images."""
    causal_lm: bool = False
    grad_inputs: Callable[[int, int], Inputs] | None = None
    """Inputs of the float64 gradient check, where they differ (larger images)."""

    @property
    def zoo(self) -> str:
        return self.name.split(":", 1)[0]


def _redraw_zero_weights(model: nn.Module) -> nn.Module:
    """torchvision and timm zero-initialise some heads and layer scales: every body
    gradient would be 0 and a comparison of gradients would prove nothing."""
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "gamma"):
                w = getattr(m, name, None)
                if isinstance(w, nn.Parameter) and w.dim() >= 1 and not w.any():
                    w.normal_(0.0, 0.02) if w.dim() > 1 else w.fill_(0.1)
    return model


def _images(channels: int, size: int) -> Callable[[int, int], Inputs]:
    return lambda batch, _length: ((torch.randn(batch, channels, size, size),), {})


def _smallest_size(build: Callable[[int], nn.Module], channels: int) -> int:
    """The smallest input side at which the freshly built original runs."""
    last: Exception | None = None
    for size in (32, 64, 96, 128, 160, 224, 299):
        try:
            model = build(size)
            with torch.no_grad():  # both modes: inception's train-only aux head
                model.eval()(torch.randn(2, channels, size, size))
                model.train()(torch.randn(2, channels, size, size))
            return size
        except Exception as e:
            last = e
    raise RuntimeError(f"runs at no input size up to 299: {last}")


# -- torchvision ------------------------------------------------------------------


def _torchvision_model(name: str, size: int) -> nn.Module:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    params = inspect.signature(builder).parameters
    kw: dict[str, Any] = {"num_classes": 10}
    if name.startswith("vit_"):
        kw["image_size"] = size  # ViT's position table is sized at build
    if name.startswith("maxvit"):
        kw["input_size"] = (size, size)
    if "aux_logits" in params or name in ("googlenet", "inception_v3"):
        kw["init_weights"] = True
    torch.manual_seed(0)
    return _redraw_zero_weights(builder(**kw))


def torchvision_entries() -> list[Entry]:
    import torchvision

    out = []
    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        out.append(_lazy_image_entry(f"torchvision:{name}", name, _torchvision_model))
    return out


def _lazy_image_entry(
    full: str, name: str, make: Callable[[str, int], nn.Module], channels: int = 3
) -> Entry:
    @functools.cache
    def size() -> int:
        return _smallest_size(lambda s: make(name, s), channels)

    @functools.cache
    def grad_size() -> int:
        """At least 64 where the model takes it: at 32 px the last stage is 1x1 and
        train-mode batch norm over 2 values per channel is so ill-conditioned
        (gradients ~1e13) that float64 rounding alone fails the check."""
        if size() >= 64:
            return size()
        try:
            with torch.no_grad():
                make(name, size()).eval()(torch.randn(2, channels, 64, 64))
        except Exception:
            return size()
        return 64

    return Entry(
        full,
        lambda: make(name, size()),
        lambda batch, length: _images(channels, size())(batch, length),
        grad_inputs=lambda batch, length: _images(channels, grad_size())(batch, length),
    )


# -- timm -------------------------------------------------------------------------


def _timm_model(name: str, size: int) -> nn.Module:
    import timm

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = timm.create_model(name, pretrained=False, num_classes=10,
                                      img_size=size)  # fmt: skip
        except TypeError:  # a model without a fixed input size
            model = timm.create_model(name, pretrained=False, num_classes=10)
    return _redraw_zero_weights(model)


def smallest_timm_per_family() -> dict[str, str]:
    """family (timm module) -> its smallest model; cached per timm version."""
    import timm

    if CACHE.exists():
        cached = json.loads(CACHE.read_text())
        if cached.get("timm") == timm.__version__:
            return cached["smallest"]
    smallest: dict[str, str] = {}
    for module in sorted(timm.list_modules()):
        best: tuple[int, str] | None = None
        for name in timm.list_models(module=module):
            try:
                with warnings.catch_warnings(), torch.device("meta"):
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False)
            except Exception:
                continue
            count = sum(p.numel() for p in model.parameters())
            best = min(best or (count, name), (count, name))
        if best is not None:
            smallest[module] = best[1]
    CACHE.write_text(json.dumps({"timm": timm.__version__, "smallest": smallest}))
    return smallest


def timm_entries() -> list[Entry]:
    out = []
    for _family, name in sorted(smallest_timm_per_family().items()):
        out.append(_lazy_image_entry(f"timm:{name}", name, _timm_model))
    return out


# -- Hugging Face -----------------------------------------------------------------

SIZES: dict[str, Any] = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 128,
    "max_position_embeddings": 64, "n_embd": 32, "n_layer": 2, "n_head": 4,
    "n_inner": 64, "n_positions": 64, "d_model": 32, "n_layers": 2, "n_heads": 4,
    "num_layers": 2, "num_heads": 4, "ffn_dim": 64, "d_ff": 64, "d_kv": 8,
    "head_dim": 8, "num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "image_size": 32, "patch_size": 8, "num_channels": 3, "embed_dim": 32,
    "hidden_sizes": [16, 32], "depths": [1, 1], "num_labels": 4,
    "conv_dim": (16, 16), "conv_stride": (5, 2), "conv_kernel": (10, 3),
    "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4,
}  # fmt: skip


def _tiny_config(cls: type) -> Any:
    default = cls()
    if getattr(default, "sub_configs", None):
        raise ValueError("a composite config (text and vision parts)")
    kw = {k: v for k, v in SIZES.items() if hasattr(default, k)}
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(default, key):
            kw[key] = 0.1
    kw["pad_token_id"] = 0
    return cls(**kw)


def _hf_text(vocab: int) -> Callable[[int, int], Inputs]:
    def make(batch: int, length: int) -> Inputs:
        g = torch.Generator().manual_seed(batch * 100 + length)
        ids = torch.randint(1, vocab, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        if batch > 1:
            mask[-1, -2:] = 0  # one padded sequence
        return (), {"input_ids": ids, "attention_mask": mask}

    return make


def _hf_entry(kind: str, model_type: str, class_name: str) -> Entry | None:
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        return None
    try:
        config = _tiny_config(cls.config_class)
    except Exception:
        return None
    suffix = "" if kind in ("lm", "encoder") else f"/{kind}"

    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls(config)

    inputs: Callable[[int, int], Inputs]
    if kind == "image":
        size = getattr(config, "image_size", 32)
        size = size[0] if isinstance(size, list | tuple) else size
        ch = getattr(config, "num_channels", 3)

        def inputs(batch: int, _length: int) -> Inputs:
            return (), {"pixel_values": torch.randn(batch, ch, size, size)}
    elif kind == "ctc":

        def inputs(batch: int, length: int) -> Inputs:
            return (), {"input_values": torch.randn(batch, 200 * length)}
    else:
        inputs = _hf_text(config.vocab_size)
    return Entry(f"hf:{model_type}{suffix}", build, inputs, causal_lm=kind == "lm")


# Every k-th architecture of each mapping, in name order: a spread of ~50 tiny
# models instead of all ~210 that build (each journey costs a minute on 2 cores).
EVERY = {"lm": 5, "base": 3, "encoder": 3, "image": 3, "ctc": 2}
ALWAYS = {"hf:gpt2", "hf:llama", "hf:llama/base", "hf:mixtral", "hf:bert"}  # most used


def hf_entries(every: dict[str, int] | None = None) -> list[Entry]:
    """``every``: keep every k-th architecture per kind (`EVERY`; 1 keeps all)."""
    from transformers.models.auto import modeling_auto as auto

    every = EVERY if every is None else every

    causal = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    plan: list[tuple[str, str, str]] = []
    for i, (t, c) in enumerate(sorted(causal.items())):
        plan.append(("lm", t, c))
        if i % 3 == 0 and t in auto.MODEL_MAPPING_NAMES:
            plan.append(("base", t, auto.MODEL_MAPPING_NAMES[t]))
    for t in sorted(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        if t not in causal and t in auto.MODEL_MAPPING_NAMES:
            plan.append(("encoder", t, auto.MODEL_MAPPING_NAMES[t]))
    for t, c in sorted(auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.items()):
        plan.append(("image", t, c))
    for t, c in sorted(auto.MODEL_FOR_CTC_MAPPING_NAMES.items()):
        plan.append(("ctc", t, c))
    entries = []
    for kind, t, c in plan:
        entry = _hf_entry(kind, t, c[0] if isinstance(c, tuple | list) else c)
        if entry is not None:
            entries.append((kind, entry))
    runs = _hf_runnable([e for _, e in entries])
    out = []
    seen: dict[str, int] = {}
    for kind, entry in entries:
        if entry.name not in runs:
            continue
        seen[kind] = seen.get(kind, -1) + 1
        if seen[kind] % every[kind] == 0 or entry.name in ALWAYS:
            out.append(entry)
    return out


def _hf_runnable(entries: list[Entry]) -> set[str]:
    """The tiny models that build and run at all (a ~2 minute scan, cached per
    transformers version)."""
    import transformers

    if HF_CACHE.exists():
        cached = json.loads(HF_CACHE.read_text())
        if cached.get("transformers") == transformers.__version__:
            return set(cached["runs"])
    runs = []
    for entry in entries:
        try:
            args, kwargs = entry.inputs(2, 8)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                entry.build().eval()(*args, **kwargs)
            runs.append(entry.name)
        except Exception:
            continue
    HF_CACHE.write_text(
        json.dumps({"transformers": transformers.__version__, "runs": runs}, indent=1)
    )
    return set(runs)


def entry_named(name: str) -> Entry:
    """One entry, without enumerating its zoo (a worker process runs one model)."""
    zoo, _, model = name.partition(":")
    if zoo not in ("torchvision", "timm", "hf") or not model:
        raise ValueError(
            f"{name!r}: a model name is zoo:model with zoo torchvision, timm or hf "
            "(`python benchmarks/zoo.py --list` prints the sweep's names)"
        )
    if zoo == "torchvision":
        return _lazy_image_entry(name, model, _torchvision_model)
    if zoo == "timm":
        return _lazy_image_entry(name, model, _timm_model)
    from transformers.models.auto import modeling_auto as auto

    t, _, kind = model.partition("/")
    mapping = {
        "": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t in
        auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else auto.MODEL_MAPPING_NAMES,
        "base": auto.MODEL_MAPPING_NAMES,
        "image": auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        "ctc": auto.MODEL_FOR_CTC_MAPPING_NAMES,
    }.get(kind)  # fmt: skip
    if mapping is None or t not in mapping:
        raise ValueError(
            f"{name!r}: transformers has no {kind or 'model'} class for model type "
            f"{t!r} (kinds: base, image, ctc; `zoo.py --list` prints the sweep's names)"
        )
    c = mapping[t]
    lm = not kind and t in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    entry = _hf_entry(
        kind or ("lm" if lm else "encoder"),
        t,
        c[0] if isinstance(c, tuple | list) else c,
    )
    if entry is None:
        raise KeyError(name)
    return entry


def all_entries(zoos: tuple[str, ...] = ("torchvision", "timm", "hf")) -> list[Entry]:
    makers = {"torchvision": torchvision_entries, "timm": timm_entries,
              "hf": hf_entries}  # fmt: skip
    lists = [makers[z]() for z in zoos]
    # Round robin over the zoos: a partial run covers each of them.
    return [e for group in itertools.zip_longest(*lists) for e in group if e]


# The subset CI runs (tests/convert/test_zoo_journey.py): small members of the
# families users reach for most, across the three zoos, every check.
CI_SUBSET = (
    "torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2",
    "torchvision:mobilenet_v3_small", "torchvision:mnasnet0_5",
    "torchvision:shufflenet_v2_x0_5", "torchvision:squeezenet1_0",
    "torchvision:regnet_y_400mf", "torchvision:efficientnet_b0",
    "torchvision:convnext_tiny", "torchvision:swin_t", "torchvision:vit_b_16",
    "torchvision:googlenet", "torchvision:densenet121",
    "timm:test_resnet", "timm:test_vit", "timm:test_convnext", "timm:test_efficientnet",
    "timm:test_byobnet", "timm:test_nfnet", "timm:test_mambaout", "timm:test_coatnet",
    "timm:test_vit_relpos", "timm:deit_tiny_patch16_224", "timm:dla46x_c",
    "timm:cspnext_tiny", "timm:mobilenetv3_small_050", "timm:regnetx_002",
    "timm:ghostnet_050", "timm:edgenext_xx_small",
    "hf:llama", "hf:llama/base", "hf:gpt2", "hf:mixtral", "hf:bert", "hf:gpt_oss/base",
    "hf:kolibri1/base", "hf:hy_v3/base", "hf:gemma2/base", "hf:albert",
    "hf:deberta-v2", "hf:modernbert", "hf:beit/image", "hf:resnet/image",
    "hf:wav2vec2/ctc",
)  # fmt: skip
