"""Trace a module's call into a GraphModule with shapes and module paths in meta.

Symbolic tracing (``torch.fx``) first: it keeps leaf modules as ``call_module`` nodes,
so dropout, drop-path and batch norm still follow ``train()``/``eval()``. Where it fails
(every Hugging Face transformers model does), ``torch.export.export(strict=False)``
(passes/export.py). Either way a module is traced for the call it receives (Note
[Trace the call, not the signature] in flat.py), the graph reads the module's own
parameters and buffers, and shapes come from fake tensors, so nothing runs for real.
Module paths in ``node.meta`` are the model's (``layer1.0.conv1``), whatever submodule
is traced, so every message names the module as the user knows it.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from revcompile.errors import TraceError
from revcompile.passes import inputs as _inputs
from revcompile.passes.capture import untouched
from revcompile.passes.export import export_graph
from revcompile.passes.flat import PREFIX, flat_module, input_names, reroot
from revcompile.passes.meta import set_module_paths, tensor_info, where
from revcompile.passes.modes import attention_dropout_modules
from revcompile.passes.ops import bound_argument, is_drop_path, name
from revcompile.passes.options import LeafSpec
from revcompile.runtime.calls import CallPattern, tensor_leaves
from revcompile.runtime.scope import bind_call

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
class Leaves:
    """Modules symbolic tracing keeps whole: classes, and paths in the whole model."""

    types: tuple[type, ...] = ()
    paths: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Traced:
    gm: fx.GraphModule
    tracer: str  # "fx" or "export"
    training: bool
    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    notes: tuple[str, ...]
    values: list[Any]  # the graph's placeholder values: the call's tensors
    pattern: CallPattern  # the call the graph replays
    out_spec: pytree.TreeSpec | None = None  # how to rebuild export's flat outputs
    path: str = ""  # the traced module's path in the model
    dtype: torch.dtype | None = field(default=None)
    """Export graphs: the model dtype their casts follow (passes/dtypes.py)."""


class LeafTracer(fx.Tracer):
    """fx's tracer plus ``leaf_modules=``; drop-path modules stay whole so that their
    train/eval switch survives tracing instead of being decided at trace time."""

    def __init__(self, leaves: Leaves, path: str) -> None:
        super().__init__()
        self.leaves, self.path = leaves, path

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name == PREFIX.rstrip("."):
            return False  # the traced module itself
        inner = module_qualified_name.removeprefix(PREFIX)
        full = ".".join(p for p in (self.path, inner) if p)
        if full in self.leaves.paths or isinstance(m, self.leaves.types):
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
    """Trace a whole model (a deep copy, unless ``copy_model=False``) on its inputs."""
    args, kwargs = _inputs.normalise(example_inputs, model)
    root = _copy(model) if copy_model else model
    notes = disable_caches(root)
    try:
        arguments = bind_call(root, args, kwargs)
    except TypeError as e:
        raise TraceError(
            f"example inputs do not match {type(model).__name__}.forward: {e}"
        ) from e
    leaves = leaf_spec(model, leaf_modules)
    traced = trace_call(root, arguments, leaves=leaves, tracer=tracer)
    return dataclasses.replace(traced, notes=(*notes, *traced.notes))


def disable_caches(model: nn.Module) -> list[str]:
    """``use_cache=False`` in the configs of a model that is about to be traced.

    A key/value cache is inference state (transformers returns it as an object no
    trace can flatten); training, and reversible stages, never use it. The converted
    model keeps the setting, and so decodes without a cache (``generate`` recomputes
    the prefix at each step).
    """
    changed = False
    for m in model.modules():
        config = getattr(m, "config", None)
        if getattr(config, "use_cache", False):
            config.use_cache = False  # type: ignore[union-attr]
            changed = True
        # Unset (None) in a generation config means generate's default, a cache: so
        # a model whose config has no use_cache still decodes with one unless told.
        generation = getattr(m, "generation_config", None)
        if getattr(generation, "use_cache", False) is not False:
            generation.use_cache = False  # type: ignore[union-attr]
            changed = True
    return ["use_cache=False (caches are for inference)"] if changed else []


def trace_call(
    module: nn.Module,
    arguments: dict[str, Any],
    *,
    leaves: Leaves = Leaves(),
    tracer: str = "auto",
    path: str = "",
) -> Traced:
    """Trace ``module`` (at ``path`` in the model) for one call, given as its bound
    arguments. The graph reads `module`'s members and never modifies them; a
    TraceError names the module that failed and suggests the fix."""
    why_not_fx = ""
    if tracer in ("auto", "fx"):
        try:
            return _symbolic(module, arguments, leaves, path)
        except TraceError:
            raise
        except Exception as e:  # user code under tracing can raise anything
            why_not_fx = _failure("symbolic tracing", e, module, path)
            if tracer == "fx":
                raise TraceError(_advice(module, why_not_fx, arguments)) from e
    try:
        return _exported(module, arguments, path, why_not_fx)
    except Exception as e:
        why = "; ".join(
            w for w in (why_not_fx, _failure("torch.export", e, module, path)) if w
        )
        raise TraceError(_advice(module, why, arguments)) from e


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
    module: nn.Module, arguments: dict[str, Any], leaves: Leaves, path: str
) -> Traced:
    flat = flat_module(module, arguments)
    tracer = LeafTracer(leaves, path)
    graph = tracer.trace(flat)
    gm = reroot(fx.GraphModule(tracer.root, graph), module)
    set_module_paths(gm, path)
    notes = _follow_mode(gm, module.training) + attention_dropout_modules(gm)
    values = flat.pattern.tensors(arguments)
    propagate_shapes(gm, values)
    inputs = _input_shapes(gm)
    return Traced(
        gm, "fx", module.training, inputs, tuple(notes), values, flat.pattern, path=path
    )


def propagate_shapes(gm: fx.GraphModule, values: list) -> None:
    """Shapes into ``node.meta["tensor_meta"]``.

    Note [Fake shapes]
    Fake tensors give every shape without running a kernel; they still count
    batch-norm steps in the real ``num_batches_tracked``, so every buffer is put
    back afterwards. A leaf module with data-dependent
    control flow (``if x.sum() > 0``) cannot run on fake tensors; then the graph runs
    once for real on the example inputs, without autograd, and the buffers it
    updated are put back.
    """
    # Built outside the mode: inside, ShapeProp would fake a copy of every weight up
    # front; this way each weight is faked once, when first read.
    prop = ShapeProp(gm)
    try:
        with untouched(gm), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [
                mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                for v in values
            ]
            prop.propagate(*fake)
    except Exception:  # a real run below raises what is wrong, if anything
        with untouched(gm, values):
            ShapeProp(gm).propagate(*values)


def _exported(
    module: nn.Module, arguments: dict[str, Any], path: str, why_not_fx: str
) -> Traced:
    notes = [f"traced with torch.export because {why_not_fx}"] if why_not_fx else []
    exported = export_graph(module, arguments)
    gm = exported.gm
    notes.extend(exported.notes)
    set_module_paths(gm, path)
    values = exported.pattern.tensors(arguments)
    propagate_shapes(gm, values)
    return Traced(
        gm,
        "export",
        module.training,
        _input_shapes(gm),
        tuple(notes),
        values,
        exported.pattern,
        exported.out_spec,
        path,
        exported.dtype,
    )


def _follow_mode(gm: fx.GraphModule, training: bool) -> list[str]:
    """Swap ``F.dropout(x, p, training=self.training)`` for an ``nn.Dropout`` call.

    Tracing evaluates ``self.training`` once, so the graph would drop out forever (or
    never). A dropout module reads the mode when it runs. Other functions given a
    ``training`` flag (``F.batch_norm``), and flags that differ from the model's mode
    (written as constants), stay as they are, and the notes say so.
    """
    fixed: dict[str, list[str]] = {}  # "batch_norm ... training=True" -> where
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        flag = bound_argument(node, "training")
        if not isinstance(flag, bool):
            continue
        cls = _DROPOUT_MODULES.get(node.target)
        data = bound_argument(node, "input")
        if cls is None or flag != training or not isinstance(data, fx.Node):
            fixed.setdefault(f"{name(node)} has training={flag}", []).append(
                where(node)
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
    return [_summary(what, places) for what, places in fixed.items()]


def _summary(what: str, places: list[str]) -> str:
    """``batch_norm has training=True fixed by tracing at features.0.1``, or, for
    many, ``12 x ... at features.0.1, features.1.1, ...``: one line per kind."""
    if len(places) == 1:
        return f"{what} fixed by tracing at {places[0]}"
    shown = ", ".join(places[:3]) + (", ..." if len(places) > 3 else "")
    return f"{len(places)} x {what} fixed by tracing, at {shown}"


def _input_shapes(gm: fx.GraphModule) -> tuple[tuple[str, tuple[int, ...]], ...]:
    found = []
    for node in gm.graph.find_nodes(op="placeholder"):
        info = tensor_info(node)
        if info is not None:
            found.append((str(node.target), info.shape))
    return tuple(found)


def leaf_spec(model: nn.Module, leaf_modules: Iterable[LeafSpec]) -> Leaves:
    """`Leaves` from ``leaf_modules=``: classes, dotted paths, submodules of `model`."""
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
    return Leaves(tuple(leaf_types), frozenset(leaf_paths))


def _failure(what: str, error: BaseException, root: nn.Module, path: str) -> str:
    """``symbolic tracing failed in h.0.attn (GPT2Attention): TypeError: ...``: the
    innermost module whose code was running when the error was raised."""
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
    inner, cls = inside
    full = ".".join(p for p in (path, inner) if p)
    return f"{what} failed in {full or '(top level)'} ({cls}): {text}"


def _advice(module: nn.Module, why: str, arguments: dict[str, Any]) -> str:
    # Training-only code that branches on data (Wav2Vec2's SpecAugment masks, LayerDrop)
    # traces in neither form; eval mode usually skips it.
    training = (
        "; or, if the model traces in eval mode, switch off its data-dependent "
        "training-only behaviour (masking, layer drop) in its config before "
        "converting, as no trace can keep it"
        if module.training
        else ""
    )
    shapes = ", ".join(
        f"{n}={tuple(v.shape)}"
        for n, v in zip(input_names(arguments), tensor_leaves(arguments), strict=True)
    )
    return (
        f"cannot trace {type(module).__name__} with inputs {shapes or '(none)'}: "
        f"{why}. Fix: keep the failing module whole with leaf_modules=[ThatModule] "
        f"(or its dotted path), or pass example_inputs= that the model accepts (a "
        f"tuple, or a dict of keyword tensors){training}"
    )
