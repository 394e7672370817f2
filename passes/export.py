"""torch.export for models symbolic tracing cannot handle, made fit for training.

Note [Export for training]
``torch.export`` specialises a graph to the example shapes and bakes the dropout mode
in as a constant (``aten.dropout(x, p, True)``). A converted model is trained on other
batch sizes and sequence lengths, and ``eval()`` must switch dropout off. So every
input dimension is exported as ``Dim.AUTO`` (export keeps dynamic what the model allows
and specialises the rest), the shape guards are dropped (they pin every dynamic size to
at least 2, which would refuse a batch of one), and each ``aten.dropout`` becomes an
``nn.Dropout`` module call, which reads the mode when it runs.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils._pytree import tree_map

from revcompile.passes.modes import attention_dropout_modules


def export_graph(
    root: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[fx.GraphModule, list[str]]:
    """An unlifted GraphModule of `root` with dynamic input sizes, plus notes."""
    notes = []
    try:
        shapes = _auto_shapes(root, args, kwargs)
        program = torch.export.export(
            root, args, kwargs, dynamic_shapes=shapes, strict=False
        )
        notes.append("torch.export kept the input sizes dynamic where the model allows")
    except Exception as e:  # some models only export with static shapes
        program = torch.export.export(root, args, kwargs, strict=False)
        notes.append(
            "torch.export specialised the graph to the example input shapes "
            f"(dynamic sizes failed: {type(e).__name__}); call the converted model "
            "with inputs of those shapes"
        )
    gm = program.module()
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"ExportedProgram.module() returned {type(gm).__name__}")
    _drop_guards(gm)
    if any("batch_norm" in str(n.target) for n in gm.graph.nodes):
        mode = "train" if root.training else "eval"
        notes.append(f"torch.export fixed batch norm in {mode} mode")
    notes.extend(_dropout_modules(gm))
    notes.extend(attention_dropout_modules(gm))
    gm.recompile()
    return gm, notes


def _auto_shapes(root: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``Dim.AUTO`` for every dimension of every tensor input, keyed by parameter."""
    bound = inspect.signature(root.forward).bind(*args, **kwargs).arguments
    params = inspect.signature(root.forward).parameters

    def auto(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return dict.fromkeys(range(value.dim()), Dim.AUTO)
        return None

    shapes = {}
    for name, value in bound.items():
        if params[name].kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: tree_map(auto, v) for k, v in value.items()}
        else:
            shapes[name] = tree_map(auto, value)
    return shapes


def _drop_guards(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target) == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")


def _dropout_modules(gm: fx.GraphModule) -> list[str]:
    """``aten.dropout(x, p, train)`` -> ``nn.Dropout(p)(x)``: it follows the mode."""
    swapped = 0
    for node in list(gm.graph.nodes):
        if (
            node.op != "call_function"
            or node.target is not torch.ops.aten.dropout.default
        ):
            continue
        x, p = node.args[0], float(node.args[1])
        name = f"revcompile_{node.name}"
        gm.add_submodule(name, nn.Dropout(p))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (x,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        swapped += 1
    return [f"{swapped} dropout ops follow train()/eval()"] if swapped else []
