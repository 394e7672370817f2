"""`revcompile.convert`: the model with every planned stage made reversible."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch import fx, nn

from revcompile.errors import ConversionError
from revcompile.passes import inputs as _inputs
from revcompile.passes.options import LeafSpec, Options
from revcompile.passes.pipeline import plan_model
from revcompile.passes.rewrite import rewrite
from revcompile.passes.trace import _bind

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
    gm, plan = plan_model(model, example_inputs, options)
    if not plan.stages:
        message = (
            f"{type(model).__name__}: nothing converts ({plan.summary()}). "
            "Run `revcompile report` on the model to see every residual block and why "
            "it stays, or lower `min_blocks`."
        )
        if strict:
            raise ConversionError(message)
        warnings.warn(message, stacklevel=2)
    args, kwargs = _inputs.normalise(example_inputs, model)
    converted, builds = rewrite(gm, plan, _bind(gm, args, kwargs))
    converted.train(model.training)
    converted.revcompile_plan = plan
    converted.revcompile_builds = builds
    return converted
