"""A module's call as a function of its tensors alone: what the tracers trace.

Note [Trace the call, not the signature]
A submodule is traced for the call it really receives (recorded with hooks on the
example, passes/calls.py): its tensors become the graph's inputs, and every other
argument (None, flags, config objects, nested non-tensor values) is a constant of the
trace, as torch.export would make it anyway. So ``attn_mask=None`` is a plain None in
the graph, not an input a branch seems to read, and data-dependent Python on those
arguments is resolved once. `Flat` wraps the module (as child ``m``) with a
``forward(t0, t1, ...)`` of fixed arity, named after the arguments; `reroot` then
strips the ``m.`` prefix, so the graph's targets and node names are the module's own.
"""

from __future__ import annotations

import keyword
import re
from typing import Any

from torch import Tensor, fx, nn
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

from revcompile.runtime.calls import CallPattern
from revcompile.runtime.scope import call_arguments

PREFIX = "m."


class Flat(nn.Module):
    """``Flat(module, arguments)(*tensors)`` calls ``module`` like the recorded call."""

    def __init__(self, module: nn.Module, arguments: dict[str, Any]) -> None:
        super().__init__()
        self.m = module
        self.pattern = CallPattern.of(arguments)

    def call(self, tensors: tuple[Tensor, ...]) -> Any:
        args, kwargs = call_arguments(self.m, self.pattern.rebuild(tensors))
        return self.m(*args, **kwargs)


def flat_module(module: nn.Module, arguments: dict[str, Any]) -> Flat:
    """A `Flat` whose ``forward`` takes one parameter per tensor of the call."""
    names = input_names(arguments)
    params = ", ".join(names)
    source = f"def forward(self, {params}):\n    return self.call(({params},))\n"
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # fx reads parameter names from the code object
    cls = type("Flat", (Flat,), {"forward": namespace["forward"]})
    return cls(module, arguments)


def input_names(arguments: dict[str, Any]) -> list[str]:
    """``x``, ``attention_mask``, ``position_embeddings_0``: one per tensor leaf."""
    names: list[str] = []
    for path, value in pytree.tree_leaves_with_path(arguments):
        if not isinstance(value, Tensor):
            continue
        name = re.sub(r"\W+", "_", pytree.keystr(path)).strip("_") or "input"
        if name[0].isdigit() or keyword.iskeyword(name) or name == "self":
            name = f"arg_{name}"
        while name in names:
            name += "_"
        names.append(name)
    return names


def reroot(traced: fx.GraphModule, module: nn.Module) -> fx.GraphModule:
    """`traced` (a trace of a `Flat` of `module`) as a GraphModule over `module`'s own
    members: targets and node names lose the ``m.`` prefix. Targets the tracer made
    itself (torch.export's constants) are taken from `traced`."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    owners: dict[str, Any] = {}
    for node in traced.graph.nodes:
        target = node.target
        if node.op in ("get_attr", "call_module"):
            target = _strip(str(target))
            owners[target] = _lookup(module, target, traced, str(node.target))
        new = graph.create_node(
            node.op,
            target,
            map_arg(node.args, env.__getitem__),
            map_arg(node.kwargs, env.__getitem__),
            name=_strip(node.name, "m_"),
            type_expr=node.type,
        )
        new.meta = dict(node.meta)
        env[node] = new
    return fx.GraphModule(owners, graph, type(module).__name__)


def _strip(text: str, prefix: str = PREFIX) -> str:
    return text[len(prefix) :] if text.startswith(prefix) else text


def _lookup(module: nn.Module, target: str, traced: fx.GraphModule, full: str) -> Any:
    """The module's own member where it has one, else what the tracer added."""
    obj: Any = module
    for part in target.split("."):
        if not hasattr(obj, part):
            break
        obj = getattr(obj, part)
    else:
        return obj
    obj = traced
    for part in full.split("."):
        obj = getattr(obj, part)
    return obj
