"""Trace a model into a GraphModule with shapes and module paths in ``node.meta``.

Symbolic tracing (``torch.fx``) first: it keeps leaf modules as ``call_module`` nodes,
so dropout, drop-path and batch norm still follow ``train()``/``eval()``. Where it fails
(every Hugging Face transformers model does), ``torch.export.export(strict=False)``:
an ATen graph specialised to the example shapes and to the model's current mode, which
the plan says in its notes. Either way the trace works on a deep copy, so the user's
model is never touched, and shapes come from fake tensors, so nothing runs for real.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from revcompile.errors import TraceError
from revcompile.passes import inputs as _inputs
from revcompile.passes.export import export_graph
from revcompile.passes.meta import set_module_paths, tensor_info, where
from revcompile.passes.modes import attention_dropout_modules
from revcompile.passes.ops import bound_argument, is_drop_path, name
from revcompile.passes.options import LeafSpec

# Functional dropouts whose `training=self.training` argument tracing would freeze.
_DROPOUT_MODULES: dict[Any, type[nn.Module]] = {
    F.dropout: nn.Dropout,
    F.dropout1d: nn.Dropout1d,
    F.dropout2d: nn.Dropout2d,
    F.dropout3d: nn.Dropout3d,
    F.alpha_dropout: nn.AlphaDropout,
    F.feature_alpha_dropout: nn.FeatureAlphaDropout,
}


@dataclass(frozen=True)
class Traced:
    gm: fx.GraphModule
    tracer: str  # "fx" or "export"
    training: bool
    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    notes: tuple[str, ...]
    values: list[Any]  # the graph's placeholder values for the example inputs


class LeafTracer(fx.Tracer):
    """fx's tracer plus ``leaf_modules=``; drop-path modules stay whole so that their
    train/eval switch survives tracing instead of being decided at trace time."""

    def __init__(
        self, leaf_types: tuple[type, ...], leaf_paths: frozenset[str]
    ) -> None:
        super().__init__()
        self.leaf_types, self.leaf_paths = leaf_types, leaf_paths

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or isinstance(m, self.leaf_types):
            return True
        return is_drop_path(m) or super().is_leaf_module(m, module_qualified_name)


def trace(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    tracer: str = "auto",
    copy_model: bool = True,
) -> Traced:
    """Trace a deep copy of ``model``; a TraceError names the module that failed.

    ``copy_model=False`` lets symbolic tracing share the model's modules, for callers
    that own a throwaway model (the CLI); torch.export always gets a copy.
    """
    args, kwargs = _inputs.normalise(example_inputs, model)
    leaf_types, leaf_paths = _leaf_spec(model, leaf_modules)
    why_not_fx = ""
    if tracer in ("auto", "fx"):
        root = _copy(model) if copy_model else model
        try:
            return _symbolic(root, args, kwargs, leaf_types, leaf_paths)
        except TraceError:
            raise
        except Exception as e:  # user code under tracing can raise anything
            why_not_fx = _failure("symbolic tracing", e, root)
            if tracer == "fx":
                raise TraceError(_advice(model, why_not_fx, args, kwargs)) from e
    root = _copy(model)  # a fresh copy: a failed trace may have run half a forward
    try:
        return _exported(root, args, kwargs, why_not_fx)
    except Exception as e:
        why = "; ".join(w for w in (why_not_fx, _failure("torch.export", e, root)) if w)
        raise TraceError(_advice(model, why, args, kwargs)) from e


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as e:
        raise TraceError(
            f"cannot trace {type(model).__name__}: copy.deepcopy(model) failed "
            f"({type(e).__name__}: {e}); revcompile traces a copy so that your model "
            f"is never modified. Make the model deep-copyable."
        ) from e


def _symbolic(
    root: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    leaf_types: tuple[type, ...],
    leaf_paths: frozenset[str],
) -> Traced:
    tracer = LeafTracer(leaf_types, leaf_paths)
    graph = tracer.trace(root)
    gm = fx.GraphModule(tracer.root, graph, type(root).__name__)
    set_module_paths(gm)
    notes = _follow_mode(gm, root.training) + attention_dropout_modules(gm)
    values = _bind(gm, args, kwargs)
    _propagate_shapes(gm, values)
    return Traced(gm, "fx", root.training, _input_shapes(gm), tuple(notes), values)


def _propagate_shapes(gm: fx.GraphModule, values: list) -> None:
    """Shapes into ``node.meta["tensor_meta"]``.

    Note [Fake shapes]
    Fake tensors give every shape without running a kernel and leave the copy's
    buffers (batch-norm statistics) as they were. A leaf module with data-dependent
    control flow (``if x.sum() > 0``) cannot run on fake tensors; then the graph runs
    once for real on the example inputs, without autograd, and the buffers it
    updated are put back.
    """
    # Built outside the mode: inside, ShapeProp would fake a copy of every weight up
    # front; this way each weight is faked once, when first read.
    prop = ShapeProp(gm)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [
                mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                for v in values
            ]
            prop.propagate(*fake)
    except Exception:  # a real run below raises what is wrong, if anything
        _propagate_for_real(gm, values)


def _propagate_for_real(gm: fx.GraphModule, values: list) -> None:
    buffers = {name: b.clone() for name, b in gm.named_buffers()}
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*values)
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(buffers[name])


def _exported(
    root: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], why_not_fx: str
) -> Traced:
    notes = [f"traced with torch.export because {why_not_fx}"] if why_not_fx else []
    config = getattr(root, "config", None)
    if getattr(config, "use_cache", False):
        # A key/value cache is inference state, returned as an object export cannot
        # flatten; training (and reversible stages) never use it.
        config.use_cache = False  # type: ignore[union-attr]
        notes.append("use_cache=False on the traced copy (caches are for inference)")
    gm, export_notes = export_graph(root, args, kwargs)
    notes.extend(export_notes)
    set_module_paths(gm)
    values = _bind(gm, args, kwargs)
    _propagate_shapes(gm, values)
    return Traced(gm, "export", root.training, _input_shapes(gm), tuple(notes), values)


def _follow_mode(gm: fx.GraphModule, training: bool) -> list[str]:
    """Swap ``F.dropout(x, p, training=self.training)`` for an ``nn.Dropout`` call.

    Tracing evaluates ``self.training`` once, so the graph would drop out forever (or
    never). A dropout module reads the mode when it runs. Other functions given a
    ``training`` flag (``F.batch_norm``), and flags that differ from the model's mode
    (written as constants), stay as they are, and the notes say so.
    """
    notes = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        flag = bound_argument(node, "training")
        if not isinstance(flag, bool):
            continue
        cls = _DROPOUT_MODULES.get(node.target)
        data = bound_argument(node, "input")
        if cls is None or flag != training or not isinstance(data, fx.Node):
            notes.append(
                f"{name(node)} at {where(node)} has training={flag} fixed by tracing"
            )
            continue
        p = bound_argument(node, "p")
        inplace = bound_argument(node, "inplace") is True
        module = f"revcompile_{node.name}"
        gm.add_submodule(module, cls(0.5 if p is None else float(p), inplace))
        with gm.graph.inserting_before(node):
            swapped = gm.graph.call_module(module, (data,))
        swapped.meta = dict(node.meta)
        node.replace_all_uses_with(swapped)
        gm.graph.erase_node(node)
    gm.recompile()
    return notes


def _bind(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list:
    """Positional values for the traced graph's placeholders."""
    rest, values, missing = list(args), [], []
    unknown = dict(kwargs)
    for node in gm.graph.find_nodes(op="placeholder"):
        key = str(node.target).lstrip("*")
        if key in unknown:
            values.append(unknown.pop(key))
        elif rest:
            values.append(rest.pop(0))
        elif node.args:  # the argument's default value
            values.append(node.args[0])
        else:
            missing.append(key)
    if missing or unknown or rest:
        raise TypeError(
            f"example inputs do not match forward(): missing {missing}, "
            f"unknown {list(unknown)}, {len(rest)} extra positional"
        )
    return values


def _input_shapes(gm: fx.GraphModule) -> tuple[tuple[str, tuple[int, ...]], ...]:
    found = []
    for node in gm.graph.find_nodes(op="placeholder"):
        info = tensor_info(node)
        if info is not None:
            found.append((str(node.target), info.shape))
    return tuple(found)


def _leaf_spec(
    model: nn.Module, leaf_modules: Iterable[LeafSpec]
) -> tuple[tuple[type, ...], frozenset[str]]:
    paths_of = {id(m): p for p, m in model.named_modules()}
    leaf_types, leaf_paths = [], set()
    for leaf in leaf_modules:
        if isinstance(leaf, type) and issubclass(leaf, nn.Module):
            leaf_types.append(leaf)
        elif isinstance(leaf, str):
            leaf_paths.add(leaf)
        elif isinstance(leaf, nn.Module) and id(leaf) in paths_of:
            leaf_paths.add(paths_of[id(leaf)])
        else:
            raise TraceError(
                f"leaf_modules entry {leaf!r} is not a module class, a dotted module "
                f"path or a submodule of {type(model).__name__}; e.g. "
                f"leaf_modules=[MyAttention] or leaf_modules=['blocks.0.attn']"
            )
    return tuple(leaf_types), frozenset(leaf_paths)


def _failure(what: str, error: BaseException, root: nn.Module) -> str:
    """``symbolic tracing failed in h.0.attn (GPT2Attention): TypeError: ...``: the
    innermost module of the copy whose code was running when the error was raised."""
    paths = {id(m): p for p, m in root.named_modules()}
    inside = None
    tb: types.TracebackType | None = error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in paths:
            inside = (paths[id(owner)], type(owner).__name__)
        tb = tb.tb_next
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]
    if inside is None:
        return f"{what} failed: {text}"
    path, cls = inside
    return f"{what} failed in {path or '(top level)'} ({cls}): {text}"


def _advice(model: nn.Module, why: str, args: tuple, kwargs: dict) -> str:
    # Training-only code that branches on data (Wav2Vec2's SpecAugment masks, LayerDrop)
    # traces in neither form; eval mode usually skips it.
    training = (
        "; or, if the model traces in eval mode, switch off its data-dependent "
        "training-only behaviour (masking, layer drop) in its config before "
        "converting, as no trace can keep it"
        if model.training
        else ""
    )
    return (
        f"cannot trace {type(model).__name__} with inputs "
        f"{_inputs.shapes(args, kwargs) or '(none)'}: {why}. Fix: keep the failing "
        f"module whole with leaf_modules=[ThatModule] (or its dotted path), or pass "
        f"example_inputs= that the model accepts (a tuple, or a dict of keyword "
        f"tensors){training}"
    )
