"""How each submodule is called on the example: the inputs a submodule is traced on.

`convert` traces as little as possible (Note [Keep the user's model] in
revcompile/runtime/scope.py): the submodule that encloses a stage is traced on its
own, on the inputs it really receives. One eager run of the model with a forward
pre-hook on every submodule records them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from revcompile.passes.capture import untouched
from revcompile.runtime.calls import CallPattern
from revcompile.runtime.scope import bind_call


@dataclass(frozen=True)
class ModuleCall:
    """The first call of a submodule, and whether its other calls were alike."""

    arguments: dict[str, Any]  # bound to the class's forward, defaults filled in
    count: int
    uniform: bool  # every call had the same pattern (Note [One call pattern per graph])
    others: tuple[dict[str, Any], ...] = ()  # the first call of each other pattern


def record_calls(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, ModuleCall]:
    """``{module path: ModuleCall}`` for one run of ``model(*args, **kwargs)``.

    The run is under no_grad; the RNG and every buffer (batch-norm statistics) are
    put back afterwards, so the model is as it was. A module whose call cannot be
    bound to its ``forward`` signature is left out (it cannot be traced on its own).
    """
    return _recorded(model, lambda: model(*args, **kwargs), (args, kwargs))


def record_generation_calls(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], padded: bool
) -> dict[str, ModuleCall]:
    """The calls a language model's ``generate`` makes (greedy, two new tokens), in
    eval mode: they differ from a training call (``position_ids`` given,
    ``use_cache=False``), so a converted model traces them too. Empty for models
    without transformers' ``generate``."""
    if not callable(getattr(model, "prepare_inputs_for_generation", None)):
        return {}
    tokens = {k: v for k, v in kwargs.items() if k in _PROMPT}
    if args and isinstance(args[0], torch.Tensor) and not tokens:
        tokens = {"input_ids": args[0]}
    if "input_ids" not in tokens:
        return {}
    # With left padding, as decoders are used, generate passes position ids; without,
    # some models leave them out: both calls are recorded (`padded`).
    mask = tokens.get("attention_mask")
    mask = torch.ones_like(tokens["input_ids"]) if mask is None else mask.clone()
    if padded:
        mask[0, 0] = 0
    else:
        mask.fill_(1)
    tokens["attention_mask"] = mask
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return _recorded(
            model,
            # Two tokens: the prompt's call and a decoding step's, which may differ.
            lambda: model.generate(**tokens, max_new_tokens=2, do_sample=False),
            tokens,
        )
    except Exception:  # a model generate does not suit: train() calls still convert
        return {}
    finally:
        for m, training in modes.items():
            m.train(training)


_PROMPT = ("input_ids", "attention_mask")


def _recorded(model: nn.Module, run: Any, inputs: Any) -> dict[str, ModuleCall]:
    paths = {id(m): p for p, m in model.named_modules()}
    first: dict[str, dict[str, Any]] = {}
    patterns: dict[str, set[bool]] = {}
    counts: dict[str, int] = {}
    others: dict[str, list[dict[str, Any]]] = {}

    def hook(module: nn.Module, a: tuple, kw: dict) -> None:
        path = paths[id(module)]
        counts[path] = counts.get(path, 0) + 1
        try:
            arguments = bind_call(module, a, kw)
        except (TypeError, ValueError):  # no Python signature to bind to
            return
        if path not in first:
            first[path] = arguments
        else:
            same = CallPattern.of(first[path]).mismatch(arguments) is None
            patterns.setdefault(path, set()).add(same)
            seen = others.setdefault(path, [])
            if not same and all(CallPattern.of(o).mismatch(arguments) for o in seen):
                seen.append(arguments)

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
    ]
    try:
        with untouched(model, inputs):
            run()
    finally:
        for h in handles:
            h.remove()
    return {
        path: ModuleCall(
            a,
            counts[path],
            all(patterns.get(path, {True})),
            tuple(others.get(path, [])),
        )
        for path, a in first.items()
    }
