"""Which submodules to trace and rewrite: the smallest that enclose each stage.

Note [Smallest enclosing submodule]
`convert` keeps the user's model and rewrites only the submodules that enclose a
stage (Note [Keep the user's model] in revcompile/runtime/scope.py): the ``layerN``
containers of a ResNet, the ``blocks`` of a ViT, the inner ``LlamaModel`` of a
``LlamaForCausalLM``. The search starts at the model: it traces a module on the call
it received (passes/calls.py) and plans it; for each stage it takes the deepest
module that holds all of the stage's nodes (their module paths' common prefix),
walking up past containers that are never called (``nn.ModuleList``) and modules
called in different ways. Where that is a strict submodule, the search goes on there,
traced on its own; the module itself is rewritten only where a stage spans its own
forward, or where a submodule could not be traced. A module that does not trace is
searched through its children, so code that no tracer handles stays eager and only
what lies below it converts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from revcompile.errors import TraceError
from revcompile.passes.analyze import find_residual_blocks
from revcompile.passes.calls import ModuleCall
from revcompile.passes.dataflow import dataflow
from revcompile.passes.ir import Plan, ResidualBlock
from revcompile.passes.meta import module_path
from revcompile.passes.options import Options
from revcompile.passes.plan import make_plan
from revcompile.passes.probe import probe_blocks
from revcompile.passes.spans import checkpointable
from revcompile.passes.trace import Leaves, Traced, trace_call


@dataclass(frozen=True)
class ScopeTrace:
    """A submodule's trace and plan; node names in the plan are its graph's."""

    path: str
    module: nn.Module
    traced: Traced
    plan: Plan


@dataclass
class Search:
    """What the search found: scopes to rewrite, and everything else it saw."""

    scopes: list[ScopeTrace] = field(default_factory=list)
    seen: list[ResidualBlock] = field(default_factory=list)
    """Blocks of traces that are no scope (for the report: every add, with a reason)."""
    failures: dict[str, TraceError] = field(default_factory=dict)
    root: Plan | None = None
    """The model's own plan, when it traced (it knows the whole model's bytes)."""


def search(
    model: nn.Module, calls: dict[str, ModuleCall], options: Options, leaves: Leaves
) -> Search:
    """Trace and plan the submodules of `model` that enclose stages."""
    found = Search()
    _visit("", model, calls, options, leaves, found)
    return found


def _visit(
    path: str,
    module: nn.Module,
    calls: dict[str, ModuleCall],
    options: Options,
    leaves: Leaves,
    found: Search,
) -> bool:
    """Search the subtree at `path`; True when it produced a scope with stages."""
    call = calls.get(path)
    traced = None
    if call is not None and call.uniform and _has_parameters(module):
        try:
            traced = trace_call(
                module, call.arguments, leaves=leaves, tracer=options.tracer, path=path
            )
        except TraceError as e:
            found.failures[path] = e
    if traced is None:
        results = [
            _visit(_join(path, name), child, calls, options, leaves, found)
            for name, child in module.named_children()
        ]
        return any(results)
    plan = plan_traced(traced, options)
    if not path:
        found.root = plan
    if not _groups(plan, traced):
        found.seen.extend(plan.blocks)
        return False
    order = {p: i for i, p in enumerate(calls)}  # first-call order: model order
    tops = sorted(_enclosing(plan, traced, path, calls), key=order.__getitem__)
    if path not in tops:
        mark = len(found.scopes), len(found.seen)
        if all(
            _visit(top, module.get_submodule(top[len(path) :].lstrip(".")), calls,
                   options, leaves, found)
            for top in tops
        ):  # fmt: skip
            found.seen.extend(b for b in plan.blocks if not _under(b, tops))
            return True
        del found.scopes[mark[0] :], found.seen[mark[1] :]  # rewrite here instead
    found.scopes.append(ScopeTrace(path, module, traced, plan))
    return True


def plan_traced(traced: Traced, options: Options) -> Plan:
    """The residual blocks and stages of one trace; for fixed_point, only blocks
    whose inverse converges (Note [Convert only what converges])."""
    df = dataflow(traced.gm)
    blocks = find_residual_blocks(traced.gm, df)
    plan = make_plan(traced, blocks, options, df)
    if not plan.stages or not options.keeps_function or options.init == "fixup":
        return plan
    rejected, notes = probe_blocks(traced, plan, options)
    if rejected:
        blocks = tuple(
            replace(b, reason=rejected[b.join]) if b.join in rejected else b
            for b in blocks
        )
        plan = make_plan(traced, blocks, options, df)
    return replace(plan, notes=(*plan.notes, *notes))


def _enclosing(
    plan: Plan, traced: Traced, path: str, calls: dict[str, ModuleCall]
) -> set[str]:
    """Each stage's smallest enclosing callable module, kept where none encloses
    another (Note [Smallest enclosing submodule])."""
    nodes = {n.name: n for n in traced.gm.graph.nodes}
    found = set()
    for names in _groups(plan, traced):
        paths = [module_path(nodes[n]).split(".") for n in names]
        common: list[str] = []
        for parts in zip(*paths, strict=False):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        top = ".".join(common)
        while top != path and not _callable(top, calls):
            top = top.rpartition(".")[0]
        found.add(top if top.startswith(path) else path)
    return {t for t in found if not any(_inside(t, o) for o in found if o != t)}


def _groups(plan: Plan, traced: Traced) -> list[list[str]]:
    """The node names of each unit a rewrite may replace: every stage (blocks and
    glue), and every kept block a checkpoint can wrap (passes/spans.py)."""
    blocks = {b.join: b for b in plan.blocks}
    groups = []
    for stage in plan.stages:
        names = [g.node for g in stage.glue]
        for join in stage.blocks:
            b = blocks[join]
            names.extend((*b.branch, *b.skip, b.join))
        groups.append(names)
    nodes = {n.name: n for n in traced.gm.graph.nodes}
    for b in plan.blocks:
        if not b.eligible and checkpointable(b, nodes):
            groups.append([*b.branch, *b.skip, b.join])
    return groups


def _callable(path: str, calls: dict[str, ModuleCall]) -> bool:
    call = calls.get(path)
    return call is not None and call.uniform


def _inside(path: str, outer: str) -> bool:
    return not outer or path.startswith(outer + ".")


def _under(block: ResidualBlock, tops: set[str]) -> bool:
    return any(block.module_path == t or _inside(block.module_path, t) for t in tops)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
