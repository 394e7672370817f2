"""The public entry points over the private passes."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch import fx, nn

from revcompile.errors import ConversionError
from revcompile.passes.ir import Plan
from revcompile.passes.options import LeafSpec, Options
from revcompile.passes.pipeline import plan_model, trace_and_plan
from revcompile.passes.rewrite import rewrite


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    min_blocks: int = 1,
    leaf_modules: Iterable[LeafSpec] = (),
    tracer: str = "auto",
) -> Plan:
    """Find the residual blocks of ``model`` and plan which convert to reversible stages.

    The model is traced on a deep copy and never modified. Every residual add appears
    once in the plan: in a stage, or with a ``Reason`` saying why it stays as it is.

    Args:
        model: any ``nn.Module``.
        example_inputs: a tuple of positional tensors, or a dict of keyword tensors
            (``{"input_ids": ids, "attention_mask": mask}``). Optional for models whose
            first layer is a Conv (a batch of 2 images of its in_channels, 64x64 or the
            model's ``image_size``), a Linear or an Embedding.
        min_blocks: the fewest blocks a stage may have.
        leaf_modules: module classes, dotted paths or instances that symbolic tracing
            keeps whole; the fix for a submodule fx cannot trace.
        tracer: ``"auto"`` (fx, then torch.export where fx fails), ``"fx"``, ``"export"``.

    Returns:
        The frozen :class:`~revcompile.passes.ir.Plan`; ``plan.to_dict()`` is JSON.

    Raises:
        TraceError: the model could not be traced; the message names the module.
        ConversionError: an option is out of range.

    Example:
        >>> import torchvision, revcompile
        >>> plan = revcompile.analyze(torchvision.models.resnet18())
        >>> print(plan.summary())
        5 of 8 residual blocks in 4 stages convert; about 42% of activation memory no longer stored; 3 blocks kept: projection shortcut
        >>> [len(stage.blocks) for stage in plan.stages]
        [2, 1, 1, 1]
    """  # noqa: E501
    options = Options.make(
        min_blocks=min_blocks, leaf_modules=leaf_modules, tracer=tracer
    )
    _, plan = plan_model(model, example_inputs, options)
    return plan


COUPLINGS = ("additive",)


def convert(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    coupling: str = "additive",
    min_blocks: int = 1,
    leaf_modules: Iterable[LeafSpec] = (),
    strict: bool = False,
) -> fx.GraphModule:
    """A copy of `model` in which every planned stage is one `ReversibleStage`.

    Everything else is the original computation and stores its activations as before
    (stems, downsampling blocks, heads). Each stage's F and G are derived from its
    blocks' branches and initialised from their weights (see Note [Slice, don't pad]
    in passes/restrict.py), so a pretrained model is a warm start for fine-tuning; the
    coupling is a different function from the residual block, so fine-tune before use.

    `model` is never modified. The plan is attached as ``converted.revcompile_plan``
    and what the rewrite did per stage as ``converted.revcompile_builds``.

    Args:
        model: any ``nn.Module``.
        example_inputs: as for `revcompile.analyze`: a tuple of tensors, a dict of
            keyword tensors, or None for vision models.
        coupling: ``"additive"`` (``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``).
        min_blocks: the fewest residual blocks a stage may have.
        leaf_modules: modules symbolic tracing keeps whole.
        strict: raise `ConversionError` when nothing converts (otherwise warn).

    Returns:
        A ``torch.fx.GraphModule``: an ordinary module for optimizers, ``state_dict``,
        ``torch.save``, ``.to()``, ``train()``/``eval()`` and DDP.

    Example:
        >>> converted = revcompile.convert(torchvision.models.resnet18())
        >>> [len(s.couplings) for s in converted.modules()
        ...  if isinstance(s, revcompile.ReversibleStage)]
        [2, 1, 1, 1]
    """
    if coupling not in COUPLINGS:
        raise ConversionError(
            f"coupling={coupling!r} is not supported; choose one of {COUPLINGS}."
        )
    options = Options.make(min_blocks=min_blocks, leaf_modules=leaf_modules)
    traced, plan = trace_and_plan(model, example_inputs, options)
    if not plan.stages:
        message = (
            f"{type(model).__name__}: nothing converts ({plan.summary()}). "
            "Run `revcompile report` on the model to see every residual block and why "
            "it stays, or lower `min_blocks`."
        )
        if strict:
            raise ConversionError(message)
        warnings.warn(message, stacklevel=2)
    converted, builds = rewrite(traced.gm, plan, traced.values)
    converted.train(model.training)
    converted.revcompile_plan = plan
    converted.revcompile_builds = builds
    return converted
