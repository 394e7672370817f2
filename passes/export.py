"""torch.export for modules symbolic tracing cannot handle, made fit for training.

Note [Export for training]
``torch.export`` specialises a graph to the example shapes, to the example dtype and
bakes the dropout mode in as a constant (``aten.dropout(x, p, True)``). A converted
model is trained on other batch sizes and sequence lengths, cast to bfloat16, and
``eval()`` must switch dropout off. So every input dimension is exported as
``Dim.AUTO`` (export keeps dynamic what the model allows and specialises the rest),
the shape guards are dropped (they pin every dynamic size to at least 2, which would
refuse a batch of one), dtypes follow the module (Note [Dtypes that follow the model]
in dtypes.py) and each ``aten.dropout`` becomes an ``nn.Dropout`` module call, which
reads the mode when it runs.

Note [Sizes of one inside the model]
Export specialises a size that is 1 at the example even when it is computed inside the
model: a 32-pixel image that a stride-32 stem brings to 1x1 bakes ``h * w == 1`` into an
attention reshape (timm's CPUBone), and the export bounds the image size to [17, 32]
to say so. Where a bound is that tight (under twice the example's size), the module is
exported again with backed sizes treated size-obliviously (experimental in torch, so
only then): it keeps such sizes symbolic. If that fails or stays bounded, the first
export stands and a note says which sizes hold.

Note [Sizes an export fixed]
Where the model branches on a size (EfficientViT-MSRA pads each map to whole
attention windows, and a 2x2 map is one window), export keeps the branch the example
took and makes the size static, pins its symbol (``if W == window``) or bounds it
above; with the guards dropped, a call of another size would run that graph into a
cryptic error or wrong numbers. The call pattern (Note [One call pattern per graph])
keeps each input size's bounds, and a call outside them is refused with the input,
the dim and both sizes. Lower bounds other than a pinned size are not kept: export
puts every dynamic size at 2 or more, and a batch of one runs.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.export import Dim
from torch.fx.experimental import _config as fx_config
from torch.utils import _pytree as pytree
from torch.utils._sympy.numbers import int_oo

from revcompile.passes.dtypes import REF, TRACED, follow_model_dtype
from revcompile.passes.flat import flat_module, reroot
from revcompile.passes.modes import attention_dropout_modules
from revcompile.runtime.calls import CallPattern, tensor_leaves


@dataclass(frozen=True)
class Exported:
    gm: fx.GraphModule  # over the module's own members, flat inputs
    pattern: CallPattern
    out_spec: pytree.TreeSpec | None  # None: the graph returns its one output
    notes: list[str]
    dtype: torch.dtype | None  # the dtype its casts follow, None if they are fixed


def export_graph(module: nn.Module, arguments: dict[str, Any]) -> Exported:
    """A GraphModule of one call of `module` with dynamic sizes, plus notes."""
    dtype = model_dtype(module, arguments)
    notes: list[str] = []
    gm, out_spec, follows = None, None, None
    if dtype is not None:  # Note [Dtypes that follow the model]
        try:
            traced = copy.deepcopy(module).to(TRACED)
            gm, out_spec = _export(traced, _to(arguments, TRACED), notes)
            gm.register_buffer(REF, torch.empty(0, dtype=dtype), persistent=False)
            if count := follow_model_dtype(gm):
                follows = dtype
                notes.append(f"{count} dtype constants follow the model's dtype")
        except Exception as e:  # some op has no float64 form: keep the dtypes fixed
            notes.append(
                f"export in float64 failed ({type(e).__name__}), so the graph's casts "
                f"stay {dtype}: cast the model before converting, not after"
            )
            gm = None
    if gm is None:
        gm, out_spec = _export(module, arguments, notes)
    gm = reroot(gm, module)
    _cast_constants(gm, module, follows)
    if any("batch_norm" in str(n.target) for n in gm.graph.nodes):
        mode = "train" if module.training else "eval"
        notes.append(f"torch.export fixed batch norm in {mode} mode")
    notes.extend(_dropout_modules(gm))
    notes.extend(attention_dropout_modules(gm))
    gm.recompile()
    pattern = CallPattern.of(arguments, same_sizes(gm), size_bounds(gm))
    return Exported(gm, pattern, out_spec, notes, follows)


def same_sizes(gm: fx.GraphModule) -> tuple[tuple[tuple[int, int], ...], ...]:
    """``(input, dim)`` groups that share one symbolic size in an exported graph
    (Note [Sizes the graph takes to be equal] in revcompile/runtime/calls.py)."""
    groups: dict[str, list[tuple[int, int]]] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        value = node.meta.get("val")
        if not isinstance(value, Tensor):
            continue
        for d, size in enumerate(value.shape):
            if isinstance(size, torch.SymInt):
                groups.setdefault(str(size), []).append((i, d))
    return tuple(tuple(g) for g in groups.values() if len({i for i, _ in g}) > 1)


def size_bounds(
    gm: fx.GraphModule,
) -> tuple[tuple[tuple[int, int] | None, ...], ...]:
    """Per input tensor of an exported graph and dim, the sizes it holds for: a
    static size ``(n, n)``, a symbol's range where export bounded it above or pinned
    it, else None (Note [Sizes an export fixed])."""

    def bound(size: int | torch.SymInt) -> tuple[int, int] | None:
        if not isinstance(size, torch.SymInt):
            return (int(size), int(size))
        node = size.node
        if (static := node.maybe_as_int()) is not None:  # a SymInt of a constant
            return (static, static)
        ranges = getattr(node.shape_env, "var_to_range", {})
        found = ranges.get(node.expr)
        if found is None or found.upper is int_oo or found.upper is None:
            return None
        try:
            low, high = int(found.lower), int(found.upper)
        except (TypeError, ValueError):
            return None
        return (low, high)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return tuple(
        tuple(bound(d) for d in value.shape)
        if isinstance(value := n.meta.get("val"), Tensor)
        else ()
        for n in placeholders
    )


def model_dtype(module: nn.Module, arguments: dict[str, Any]) -> torch.dtype | None:
    """The floating dtype the module computes in: its parameters' and buffers' most
    common one, else its floating inputs'; None when nothing is floating."""
    counts = Counter(
        t.dtype
        for t in (*module.parameters(), *module.buffers())
        if t.is_floating_point()
    )
    if counts:
        return counts.most_common(1)[0][0]
    floating = [t.dtype for t in tensor_leaves(arguments) if t.is_floating_point()]
    return floating[0] if floating else None


def _to(arguments: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    def cast(v: Any) -> Any:
        return v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v

    return pytree.tree_map(cast, arguments)


def _export(
    module: nn.Module, arguments: dict[str, Any], notes: list[str]
) -> tuple[fx.GraphModule, pytree.TreeSpec | None]:
    flat = flat_module(module, arguments)
    tensors = tuple(tensor_leaves(arguments))
    auto = tuple(dict.fromkeys(range(t.dim()), Dim.AUTO) for t in tensors)
    try:
        program = torch.export.export(flat, tensors, dynamic_shapes=auto, strict=False)
        notes.append("torch.export kept the input sizes dynamic where the model allows")
        if tight := _tight_sizes(program):  # Note [Sizes of one inside the model]
            program = _size_oblivious(flat, tensors, auto, program, tight, notes)
    except Exception as e:  # some models only export with static shapes
        program = torch.export.export(flat, tensors, strict=False)
        notes.append(
            "torch.export specialised the graph to the example input shapes "
            f"(dynamic sizes failed: {type(e).__name__}); call the converted model "
            "with inputs of those shapes"
        )
    gm = program.module()
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"ExportedProgram.module() returned {type(gm).__name__}")
    out_spec = _flat_output(gm)
    _drop_guards(gm)
    return gm, out_spec


def _tight_sizes(program: torch.export.ExportedProgram) -> list[str]:
    """Input sizes the export bounded to less than twice the example's: it took a
    branch (a size of one it specialised, a crop) that holds near the example only."""
    tight = []
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        for size in getattr(value, "shape", ()):
            if not isinstance(size, torch.SymInt):
                continue
            bounds = program.range_constraints.get(size.node.expr)
            hint = size.node.hint
            if bounds is None or bounds.upper is int_oo or not isinstance(hint, int):
                continue
            if bounds.upper < 2 * hint:
                tight.append(f"{size.node.expr} in [{bounds.lower}, {bounds.upper}]")
    return sorted(set(tight))


def _size_oblivious(
    flat: nn.Module,
    tensors: tuple[Tensor, ...],
    auto: tuple[dict[int, Any], ...],
    program: torch.export.ExportedProgram,
    tight: list[str],
    notes: list[str],
) -> torch.export.ExportedProgram:
    """Export again without specialising backed sizes of one; keep what holds wider."""
    try:
        with fx_config.patch(backed_size_oblivious=True):
            wider = torch.export.export(
                flat, tensors, dynamic_shapes=auto, strict=False
            )
    except Exception as e:
        wider, why = None, f"{type(e).__name__}"
    else:
        why = ", ".join(_tight_sizes(wider))
    if wider is not None and not why:
        notes.append(
            f"torch.export bounded input sizes near the example ({', '.join(tight)}): "
            "exported again without specialising sizes of one, so other sizes work"
        )
        return wider
    notes.append(
        f"torch.export bounded input sizes near the example ({', '.join(tight)}; a "
        f"size-oblivious export did not widen them: {why}): convert with an example "
        "of the sizes you will run, or larger ones"
    )
    return program


def _flat_output(gm: fx.GraphModule) -> pytree.TreeSpec | None:
    """Plain code generation: the graph returns its flat outputs (or its only one)."""
    out_spec = gm._out_spec
    gm.graph._codegen = fx.graph.CodeGen()
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves = output.args[0]
    if out_spec.is_leaf() and isinstance(leaves, (tuple, list)) and len(leaves) == 1:
        output.args = (leaves[0],)
        return None
    return out_spec


def _cast_constants(
    gm: fx.GraphModule, module: nn.Module, follows: torch.dtype | None
) -> None:
    """Tensors the tracer computed and baked in (not the module's own) were made in
    float64 when they follow the model: bring them to the model's dtype, as buffers,
    so that ``.to()`` casts them on."""
    own = {id(t) for t in (*module.parameters(), *module.buffers())}
    for target in {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}:
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        value = getattr(owner, name)
        if not isinstance(value, Tensor) or id(value) in own or target == REF:
            continue
        if value.dtype is TRACED and follows is not None:
            owner.register_buffer(name, value.to(follows), persistent=False)


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
