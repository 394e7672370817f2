"""What autograd really saves for backward, per tensor and saver, on the example.

Note [Measured activation bytes]
The memory planner predicts a plan's activation memory from what the ops save for
backward, and an op's output size says little about that (an add saves nothing, a
batch norm its input and two statistics, attention its softmax). So each traced
submodule runs once on the example, with grad, under ``saved_tensors_hooks``,
recording for every saved tensor (by storage: a ReLU's output that the next conv
saves again is one tensor) its size and which nodes save it; parameters never count.
One eager run of the whole model gives the total, links each submodule's input and
output to the tensors the model around it passes and saves, and tells which tensors
code outside the submodules saves. A plan then keeps a tensor while any node that
saves it survives the plan, plus what its stages and checkpoints save themselves;
the bytes scale with the batch, so budgets are stated as fractions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

Value = str  # "path:ptr" inside a submodule's run, "@ptr" in the whole model's


@dataclass
class Ledger:
    """Tensors saved for backward: sizes, savers, and which node made each."""

    sizes: dict[Value, int] = field(default_factory=dict)
    savers: dict[Value, set[str]] = field(default_factory=dict)  # "path:node"
    made_by: dict[str, Value] = field(default_factory=dict)  # "path:node" -> value
    outside: set[Value] = field(default_factory=set)  # saved by eager code too

    def predict(
        self,
        removed: set[str],
        added: Iterable[Value],
        fresh: Iterable[tuple[Value, set[str]]] = (),
    ) -> int:
        """Bytes kept when the nodes in `removed` no longer save anything, `added`
        values are saved by stages and checkpoints, and each `fresh` value's savers
        (an in-place op made out of place) save a copy of that size instead."""
        moved = dict(fresh)
        kept = 0
        for value, size in self.sizes.items():
            savers = self.savers.get(value, set()) - moved.get(value, set())
            if value in self.outside or savers - removed:
                kept += size
        extra = set(added)
        kept += sum(
            self.sizes.get(v, 0) for v in extra if not self._kept(v, removed, moved)
        )
        kept += sum(
            self.sizes.get(v, 0) for v, savers in moved.items() if savers - removed
        )
        return kept

    def _kept(self, value: Value, removed: set[str], moved: dict) -> bool:
        savers = self.savers.get(value, set()) - moved.get(value, set())
        return value in self.outside or bool(savers - removed)


class _Recording(fx.Interpreter):
    """Runs a submodule's graph, charging saved tensors to the running node."""

    def __init__(
        self, gm: fx.GraphModule, path: str, ledger: Ledger, names: dict
    ) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.path, self.ledger, self.names = path, ledger, names
        self.current = ""
        self.params = {id(p) for p in gm.parameters()}

    def value(self, t: Tensor) -> Value:
        ptr = t.untyped_storage().data_ptr()
        return self.names.get(ptr, f"{self.path}:{ptr}")

    def run_node(self, n: fx.Node) -> Any:
        self.current = f"{self.path}:{n.name}"
        out = super().run_node(n)
        if isinstance(out, Tensor):
            self.ledger.made_by.setdefault(self.current, self.value(out))
        return out

    def pack(self, t: Tensor) -> Tensor:
        if id(t) not in self.params and not isinstance(t, nn.Parameter):
            value = self.value(t)
            self.ledger.sizes[value] = t.untyped_storage().nbytes()
            self.ledger.savers.setdefault(value, set()).add(self.current)
        return t


@dataclass(frozen=True)
class Whole:
    """The whole model's run: its total, and its submodules' inputs and outputs."""

    total: int
    inputs: dict[str, int]  # path -> storage of its first tensor argument
    outputs: dict[str, int]  # path -> storage of its output
    outside: set[int]  # storages saved by code outside every submodule


def measure_model(
    model: nn.Module, args: tuple, kwargs: dict, watch: dict[str, nn.Module]
) -> Whole:
    """One eager forward with grad (RNG and buffers put back, nothing kept)."""
    params = {id(p) for p in model.parameters()}
    sizes: dict[int, int] = {}
    outside: set[int] = set()
    inputs: dict[str, int] = {}
    outputs: dict[str, int] = {}
    depth = 0

    def enter(path: str) -> Any:
        def hook(module: nn.Module, a: tuple) -> None:
            nonlocal depth
            depth += 1
            first = next((v for v in a if isinstance(v, Tensor)), None)
            if first is not None:
                inputs.setdefault(path, first.untyped_storage().data_ptr())

        return hook

    def leave(path: str) -> Any:
        def hook(module: nn.Module, a: tuple, out: Any) -> None:
            nonlocal depth
            depth -= 1
            if isinstance(out, Tensor):
                outputs.setdefault(path, out.untyped_storage().data_ptr())

        return hook

    def pack(t: Tensor) -> Tensor:
        if id(t) not in params:
            ptr = t.untyped_storage().data_ptr()
            sizes[ptr] = t.untyped_storage().nbytes()
            if depth == 0:
                outside.add(ptr)
        return t

    handles = [m.register_forward_pre_hook(enter(p)) for p, m in watch.items()]
    handles += [m.register_forward_hook(leave(p)) for p, m in watch.items()]
    with _kept_as_is(model), torch.autograd.graph.saved_tensors_hooks(pack, _same):
        model(*args, **kwargs)
    for h in handles:
        h.remove()
    return Whole(sum(sizes.values()), inputs, outputs, outside)


def record_scope(
    ledger: Ledger,
    path: str,
    gm: fx.GraphModule,
    values: list[Any],
    whole: Whole,
) -> None:
    """Add one submodule's saved tensors to `ledger`; its input and output are the
    whole model's tensors (Note [Measured activation bytes])."""
    names: dict[int, Value] = {}
    inputs = [
        v.detach().requires_grad_(True)
        if isinstance(v, Tensor) and v.is_floating_point()
        else v
        for v in values
    ]
    first = next((v for v in inputs if isinstance(v, Tensor)), None)
    if first is not None and path in whole.inputs:
        names[first.untyped_storage().data_ptr()] = f"@{whole.inputs[path]}"
    run = _Recording(gm, path, ledger, names)
    with _kept_as_is(gm), torch.autograd.graph.saved_tensors_hooks(run.pack, _same):
        out = run.run(*inputs)
    if isinstance(out, Tensor) and path in whole.outputs:
        local = run.value(out)
        _rename(ledger, local, f"@{whole.outputs[path]}")
    for value in list(ledger.sizes):
        if value.startswith("@") and int(value[1:]) in whole.outside:
            ledger.outside.add(value)


def _same(t: Tensor) -> Tensor:
    return t


def _rename(ledger: Ledger, old: Value, new: Value) -> None:
    if old == new:
        return
    if old in ledger.sizes:
        ledger.sizes[new] = ledger.sizes.pop(old)
    if old in ledger.savers:
        ledger.savers.setdefault(new, set()).update(ledger.savers.pop(old))
    for node, value in ledger.made_by.items():
        if value == old:
            ledger.made_by[node] = new


class _kept_as_is:
    """Grad on, the RNG and every buffer put back afterwards."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.buffers = {k: b.clone() for k, b in self.module.named_buffers()}
        self.rng = torch.random.fork_rng()
        self.rng.__enter__()
        self.grad = torch.enable_grad()
        self.grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        self.rng.__exit__(*exc)
        with torch.no_grad():
            for k, b in self.module.named_buffers():
                b.copy_(self.buffers[k])
