"""The forward of a converted submodule: its rewritten graph, run on the submodule.

Note [Keep the user's model]
`convert` returns the user's model, of its own class, with its own attributes and
methods. Only the submodules that enclose a reversible stage change, and each keeps
its class too: its members (child modules, parameters, buffers) become those its
rewritten graph reads, and its ``forward`` attribute becomes a `TracedForward`, which
binds each call to the class's own signature (Note [One call pattern per graph] in
calls.py) and runs the graph's generated code with the submodule itself as ``self``.
The code reads the submodule's members when it runs, so after ``.to()``,
``load_state_dict`` or a deep copy there is nothing to re-link. Unpickling re-traces
each graph (Note [Unpickling re-traces] in graphs.py), and the re-trace turns a plain
tensor attribute the code reads (one that is neither parameter nor buffer) into a
new ``_tensor_constantN`` of the graph: the first call after loading gives the
submodule those too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from revcompile.errors import CallPatternError
from revcompile.runtime.calls import CallPattern, Fill


@dataclass(frozen=True)
class Variant:
    """One traced call pattern and the graph that computes it."""

    pattern: CallPattern
    graph: fx.GraphModule
    out_spec: pytree.TreeSpec | None  # torch.export returns flat outputs


@dataclass(frozen=True)
class Refused:
    """A call pattern convert traced but could give no graph, and why not."""

    pattern: CallPattern
    why: str


class TracedForward:
    """Stands in for ``owner.forward`` (Note [Keep the user's model])."""

    # The calls convert also traced (generate's, another padding mask's) that got no
    # graph: a call like them is refused with the reason. On the class, so that a
    # module pickled before this attribute existed loads with none.
    refused: tuple[Refused, ...] = ()

    def __init__(
        self,
        owner: nn.Module,
        variants: Sequence[Variant],
        path: str,
        fills: Sequence[Fill] = (),
    ) -> None:
        self.owner = owner
        self.variants = tuple(variants)
        self.path = path
        self.fills = tuple(fills)

    def __repr__(self) -> str:
        return f"TracedForward({self.path or 'model'}, {len(self.variants)} graph(s))"

    @property
    def __signature__(self) -> inspect.Signature:
        """The class's own, so that code inspecting ``owner.forward`` (transformers'
        ``generate`` picks the arguments it passes by it) sees the user's."""
        signature = _signature(type(self.owner).forward)
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    @property
    def code(self) -> str:
        """The generated Python code of the (first) graph, for reading."""
        return self.variants[0].graph.code

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._unlinked = True  # the owner may still be half-built: link on first call

    def _link(self) -> None:
        for variant in self.variants:
            for node in variant.graph.graph.nodes:
                target = str(node.target)
                if node.op == "get_attr" and resolve(self.owner, target) is None:
                    assign(self.owner, target, resolve(variant.graph, target))
        self._unlinked = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A deep copy passes through __setstate__ too and has nothing to link; under
        # dynamo, reading the graphs would break the graph.
        if self.__dict__.get("_unlinked") and not torch.compiler.is_compiling():
            self._link()
        given = bind_call(self.owner, args, kwargs)
        arguments = dict(given)  # fills write here; a refusal names the call as made
        variant = self._match(arguments)
        if variant is None and any([f.apply(arguments) for f in self.fills]):
            variant = self._match(arguments)
        if variant is None:
            raise self._refusal(given)
        tensors = variant.pattern.tensors(arguments)
        out = type(variant.graph).forward(self.owner, *tensors)
        if variant.out_spec is None:
            return out
        return pytree.tree_unflatten(list(out), variant.out_spec)

    def _match(self, arguments: dict[str, Any]) -> Variant | None:
        for variant in self.variants:
            if variant.pattern.mismatch(arguments) is None:
                return variant
        return None

    def _refusal(self, arguments: dict[str, Any]) -> CallPatternError:
        name = f"{self.path or 'the model'} ({type(self.owner).__name__})"
        for refused in self.refused:
            if refused.pattern.mismatch(arguments) is None:
                return CallPatternError(
                    f"{name} has no graph for this call: convert traced this way of "
                    f"calling it too (generate's, or another padding mask's), but "
                    f"{refused.why}, so the call is refused rather than run on a "
                    f"graph traced for another (Note [Graphs that share one stage] in "
                    f"passes/variants.py). Calls like the example's still run; "
                    f"please report this with the model."
                )
        differences = [v.pattern.mismatch(arguments) for v in self.variants]
        what = "; ".join(d for d in differences if d)
        others = "".join(
            f" Convert also traced another call that got no graph: {why}."
            for why in dict.fromkeys(r.why for r in self.refused)
        )
        return CallPatternError(
            f"{name} was converted from a trace of one way of calling it and this "
            f"call differs: {what}. A converted submodule replays the call it was "
            f"traced on (Note [One call pattern per graph] in "
            f"revcompile/runtime/calls.py).{others} Call it as during conversion, or "
            f"convert with example_inputs that make this call."
        )


def resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def assign(owner: nn.Module, target: str, value: Any) -> None:
    *path, name = target.split(".")
    parent = owner
    for part in path:
        child = getattr(parent, part, None)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
        # The tracer's constants and the dtype reference are no state of the model.
        parent.register_buffer(name, value, persistent=False)
    else:
        setattr(parent, name, value)


def bind_call(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``{parameter: value}`` of a call of `module`, as its class's ``forward`` binds
    it (without ``self``, defaults filled in)."""
    bound = _signature(type(module).forward).bind(module, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(arguments)))  # self
    return arguments


def call_arguments(module: nn.Module, arguments: dict[str, Any]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` that call `module` with `arguments` (the inverse of
    `bind_call`): by keyword wherever the signature allows, since decorators on a
    ``forward`` (transformers' deprecation shims) may not keep positions."""
    params = list(_signature(type(module).forward).parameters.values())[1:]
    kinds = {p.name: p.kind for p in params}
    starred = any(
        kinds[n] is inspect.Parameter.VAR_POSITIONAL and v for n, v in arguments.items()
    )
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name, value in arguments.items():
        kind = kinds[name]
        if kind is inspect.Parameter.VAR_POSITIONAL:
            args.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        elif kind is inspect.Parameter.POSITIONAL_ONLY or (
            starred and kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        ):
            args.append(value)
        else:
            kwargs[name] = value
    return tuple(args), kwargs


_SIGNATURES: dict[Callable[..., Any], inspect.Signature] = {}


def _signature(forward: Callable[..., Any]) -> inspect.Signature:
    # A plain dict, not functools.cache: dynamo traces a dict lookup without warning.
    if forward not in _SIGNATURES:
        _SIGNATURES[forward] = inspect.signature(forward)
    return _SIGNATURES[forward]
