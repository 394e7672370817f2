"""The public entry points over the private passes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from revcompile.passes.ir import Plan
from revcompile.passes.options import LeafSpec, Options
from revcompile.passes.pipeline import plan_model


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
