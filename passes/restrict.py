"""Restrict a residual branch to one half of the channels: the F or G of a coupling.

Note [Slice, don't pad]
F maps the x2 half of the stream to the x1 half. Any function of x2 keeps the coupling
exactly invertible, so slicing is about cost and warm start, never correctness. Walking
forward from the stream, the ops that read it take the input-channel slice: channel
mixing ops (conv, linear) lose input channels, per-channel ops (norms, depthwise convs,
layer scales) lose channels. Walking back from the branch output, the ops that write it
take the output slice. The hidden width in between is kept whole here, so every
pretrained hidden unit survives and attention heads need no surgery; hidden.py
narrows it afterwards where F+G would cost more than the branch (Note [Hidden
width]). `nn.MultiheadAttention` holds
both of its projections, so one call is sliced on both sides (passes/attention.py).

Where an op is not understood, the walk stops at a boundary: a zero-pad back to all C
channels in front of the op on the input side (for an op linear in its input this
equals slicing), a narrow behind it on the output side. So the pass never fails; it
records every boundary it needed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from revcompile.passes.attention import (
    attention_call,
    attention_width,
    reads_as_qkv,
    sliced_attention,
)
from revcompile.passes.slicing import (
    Sel,
    mixing_channels,
    per_channel_size,
    slice_mixing,
    slice_per_channel,
    take,
)
from revcompile.passes.split_ops import (
    is_binary,
    is_layout,
    is_unary,
    keeps_channels,
    op_name,
    shape_of,
)
from revcompile.passes.tidy import drop_unused_attributes, eliminate_dead_code
from revcompile.runtime.branches import full_size, narrow_channels, pad_channels

_NORM_FUNCS = {"layer_norm", "rms_norm"}
# (weight arg index, weight's input-channel axis, output axis, bias arg index)
MIX_FUNCS = {
    "linear": (1, 1, 0, 2),
    "addmm": (2, 0, 1, 0),
    "mm": (1, 0, 1, None),
    "matmul": (1, 0, 1, None),
    "conv1d": (1, 1, 0, 2),
    "conv2d": (1, 1, 0, 2),
    "conv3d": (1, 1, 0, 2),
}
STREAM_ARG = {"addmm": 1}  # which argument carries the activations (default 0)


@dataclass
class Restriction:
    """What restricting one branch did, for the plan and the report."""

    sliced: list[str] = field(default_factory=list)  # layers whose weights shrank
    padded: list[str] = field(default_factory=list)  # ops fed a zero-padded input
    narrowed: list[str] = field(default_factory=list)  # values narrowed after an op
    degenerate: bool = False  # a channel-wise path from the input to the output


def restrict(
    branch: fx.GraphModule, *, dim: int, channels: int, in_sel: Sel, out_sel: Sel
) -> tuple[fx.GraphModule, Restriction]:
    """A copy of `branch` that reads channels `in_sel` of its first input and writes
    channels `out_sel` of its output. Nodes must carry shapes (ShapeProp)."""
    gm = copy.deepcopy(branch)
    for node in list(gm.graph.nodes):
        # torch.export's shape guards would pin the full channel count (and batch).
        if node.op == "call_module" and str(node.target) == "_guards_fn":
            gm.graph.erase_node(node)
    walk = Walk(gm, dim, channels, in_sel, out_sel)
    walk.forward()
    walk.backward()
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    drop_unused_attributes(gm)
    gm.recompile()
    return gm, walk.record


def _aligned(axis: int, rank: int, operand: Any) -> int | None:
    """`axis` of a rank-`rank` result as an axis of a broadcast operand, if present."""
    shape = shape_of(operand)
    if shape is None:
        return None
    a = axis - (rank - len(shape))
    return a if a >= 0 else None


class Walk:
    def __init__(
        self,
        gm: fx.GraphModule,
        dim: int,
        channels: int,
        in_sel: Sel,
        out_sel: Sel,
        stream: fx.Node | None = None,
    ) -> None:
        """`stream`: the value whose channels `in_sel` keeps (default: the first
        input; passes/hidden.py walks from a hidden layer's output instead)."""
        self.gm, self.graph, self.c = gm, gm.graph, channels
        self.in_sel, self.out_sel = in_sel, out_sel
        self.record = Restriction()
        if stream is None:
            stream = next(n for n in self.graph.nodes if n.op == "placeholder")
        self.dim = dim % len(shape_of(stream) or (0,) * (dim + 1))
        self.in_axis: dict[fx.Node, int] = {stream: self.dim}
        self.fresh = 0

    # -- edits ---------------------------------------------------------------------

    def _name(self, base: str) -> str:
        self.fresh += 1
        return f"{base.replace('.', '_')}_rc{self.fresh}"

    def _swap_module(self, node: fx.Node, new: nn.Module) -> None:
        name = self._name(str(node.target))
        self.gm.add_submodule(name, new)
        node.target = name

    def _sliced_attr(self, attr: fx.Node, axis: int, sel: Sel, user: fx.Node) -> bool:
        """Give `user` its own get_attr of `attr`'s tensor restricted to `sel`."""
        if attr.op != "get_attr":
            return False
        t = (
            self.gm.get_parameter(str(attr.target))
            if _is_param(self.gm, attr)
            else None
        )
        t = t if t is not None else getattr(self.gm, str(attr.target), None)
        if t is None or t.dim() <= axis or t.shape[axis] != self.c:
            return False
        name = self._name(str(attr.target))
        new = take(t, axis, sel)
        if isinstance(t, nn.Parameter):
            self.gm.register_parameter(name, nn.Parameter(new, t.requires_grad))
        else:
            self.gm.register_buffer(name, new)
        with self.graph.inserting_before(user):
            fresh = self.graph.get_attr(name)
        user.replace_input_with(attr, fresh)
        return True

    def _narrow_operand(
        self, node: fx.Node, operand: fx.Node, axis: int, sel: Sel
    ) -> None:
        with self.graph.inserting_before(node):
            cut = self.graph.call_function(narrow_channels, (operand, axis, *sel))
        node.replace_input_with(operand, cut)

    def slice_writer(self, node: fx.Node, axis: int) -> bool:
        """Slice the mixing layer `node` to write only channels `in_sel` (on `axis`
        of its output): the start of a walk from a hidden layer."""
        rank = len(shape_of(node) or ())
        if node.op == "call_module":
            m = self.gm.get_submodule(str(node.target))
            mix = mixing_channels(m)
            if not mix or mix[1] != self.c or not _where(mix[2], axis, rank):
                return False
            self._swap_module(node, slice_mixing(m, None, self.in_sel))
            return True
        name = op_name(node)
        if name not in MIX_FUNCS:
            return False
        stream = node.args[STREAM_ARG.get(name, 0)]
        return isinstance(stream, fx.Node) and self._mix(
            node, stream, axis, rank, self.in_sel, False
        )

    # -- the input side --------------------------------------------------------------

    def forward(self) -> None:
        for node in list(self.graph.nodes):
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            srcs = [a for a in node.all_input_nodes if a in self.in_axis]
            if not srcs:
                continue
            axis = self._forward_one(node, srcs, self.in_axis[srcs[0]])
            if axis == "pad":
                for arg in srcs:
                    full = (arg, self.in_axis[arg], self.c, self.in_sel[0])
                    with self.graph.inserting_before(node):
                        padded = self.graph.call_function(pad_channels, full)
                    node.replace_input_with(arg, padded)
                self.record.padded.append(node.name)
            elif axis is not None:
                self.in_axis[node] = axis

    def _forward_one(self, node: fx.Node, srcs: list[fx.Node], axis: int) -> Any:
        """The stream axis of `node`'s output, None if it mixes channels, or "pad"."""
        src = srcs[0]
        rank = len(shape_of(src) or ())
        if node.op == "call_module":
            m = self.gm.get_submodule(str(node.target))
            if is_unary(node, self.gm) and node.args[0] is src:
                return axis
            if keeps_channels(node, self.gm, axis) and node.args[0] is src:
                return axis
            pc = per_channel_size(m)
            if pc and pc[0] == self.c and _where(pc[1], axis, rank):
                self._swap_module(node, slice_per_channel(m, self.in_sel))
                return axis
            mix = mixing_channels(m)
            if mix and mix[0] == self.c and _where(mix[2], axis, rank):
                self._swap_module(node, slice_mixing(m, self.in_sel, None))
                self.record.sliced.append(node.name)
                return None
            if type(m).__name__ == "Permute":
                return list(m.dims).index(axis)
            if self._attention_reads(node, m, srcs, axis, rank):
                return None
            return "pad"
        if is_unary(node, self.gm) or keeps_channels(node, self.gm, axis):
            return axis if node.args and node.args[0] is src else "pad"
        if is_binary(node):
            return axis if self._binary(node, axis, self.in_sel) else "pad"
        if is_layout(node, self.gm):
            moved = _layout(node, src, axis, forward=True, new=self.in_sel)
            return "pad" if moved is None else moved
        name = op_name(node)
        if _is_size_read(node) and node.args[0] is src:
            node.target = full_size
            node.op = "call_function"
            dim = node.args[1:2] if name != "getattr" else ()
            node.args = (src, axis, self.c, *dim)
            node.kwargs = {}
            return None
        if name in _NORM_FUNCS and node.args[0] is src and axis == rank - 1:
            return axis if self._norm(node, self.in_sel) else "pad"
        if name in MIX_FUNCS and self._mix(node, src, axis, rank, self.in_sel, True):
            return None
        return "pad"

    def _binary(self, node: fx.Node, axis: int, sel: Sel) -> bool:
        """Bring every other tensor operand with C channels on `axis` down to `sel`."""
        operands = self._channel_operands(node, axis)
        if operands is None:
            return False
        for operand, a in operands:
            if operand in self.in_axis:
                if self.in_axis[operand] != a:
                    return False
            elif not self._sliced_attr(operand, a, sel, node):
                self._narrow_operand(node, operand, a, sel)
        return True

    def _channel_operands(
        self, node: fx.Node, axis: int
    ) -> list[tuple[fx.Node, int]] | None:
        """Operands of a broadcasting op holding the C channels, with their own axis;
        None when one has another size there (it cannot follow the split)."""
        rank = len(shape_of(node) or ())
        found = []
        for operand in node.all_input_nodes:
            a = _aligned(axis, rank, operand)
            shape = shape_of(operand)
            if a is None or shape is None or shape[a] == 1:
                continue
            if shape[a] != self.c:
                return None
            found.append((operand, a))
        return found

    def _norm(self, node: fx.Node, sel: Sel) -> bool:
        """layer_norm / rms_norm over the channel axis: shrink shape and affine."""
        shape = node.args[1]
        if list(shape) != [self.c]:
            return False
        n = sel[1] - sel[0]
        for arg in node.args[2:4]:
            if isinstance(arg, fx.Node) and not self._sliced_attr(arg, 0, sel, node):
                return False
        node.args = (node.args[0], [n], *node.args[2:])
        return True

    def _mix(
        self, node: fx.Node, src: fx.Node, axis: int, rank: int, sel: Sel, reads: bool
    ) -> bool:
        """A functional linear / addmm / matmul / conv reading or writing the stream."""
        name = op_name(node)
        w_i, w_in, w_out, b_i = MIX_FUNCS[name]
        if node.args[STREAM_ARG.get(name, 0)] is not src:
            return False
        if name.startswith("conv"):
            groups = (
                node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
            )
            if groups != 1 or axis != 1:
                return False
        elif axis != rank - 1:
            return False
        w = node.args[w_i] if len(node.args) > w_i else None
        if not isinstance(w, fx.Node) or len(w.users) != 1:
            return False
        if not self._sliced_attr(w, w_in if reads else w_out, sel, node):
            return False
        if not reads and b_i is not None and len(node.args) > b_i:
            bias = node.args[b_i]
            if isinstance(bias, fx.Node) and not self._sliced_attr(bias, 0, sel, node):
                return False
        self.record.sliced.append(node.name)
        return True

    def _attention_reads(
        self, node: fx.Node, m: nn.Module, srcs: list[fx.Node], axis: int, rank: int
    ) -> bool:
        """Self-attention over the stream: its input projection loses input channels.
        Cross-attention, masks computed from the stream and the like are padded."""
        if attention_width(m) != self.c or axis != rank - 1 or len(srcs) != 1:
            return False
        if not reads_as_qkv(node, srcs[0]):
            return False
        new = sliced_attention(m, self.in_sel, None)
        if new is None:
            return False
        self._swap_module(node, new)
        self.record.sliced.append(node.name)
        return True

    # -- the output side -------------------------------------------------------------

    def backward(self) -> None:
        out = next(n for n in self.graph.nodes if n.op == "output")
        result = out.args[0]
        if isinstance(result, tuple | list) and len(result) == 1:
            result = result[0]  # torch.export returns a one-element tuple
        if not isinstance(result, fx.Node):
            return
        wanted: dict[fx.Node, int] = {result: self.dim}
        readers: dict[fx.Node, set[fx.Node]] = {result: {out}}
        # Reverse topological order: a node is visited after all of its readers.
        for node in reversed(list(self.graph.nodes)):
            if node not in wanted:
                continue
            axis, on_path = wanted[node], readers[node]
            if node in self.in_axis:  # stream channels reach the output unmixed
                self.record.degenerate = True
                self._narrow_after(node, axis, on_path, from_in=True)
                continue
            if any(u not in on_path for u in node.users):
                self._narrow_after(node, axis, on_path)  # another reader needs all C
                continue
            producers = self._backward_one(node, axis)
            if producers is None:
                self._narrow_after(node, axis, on_path)
                continue
            for producer, a in producers:
                if wanted.setdefault(producer, a) != a:
                    self._narrow_after(node, axis, on_path)
                    break
                readers.setdefault(producer, set()).add(node)

    def _backward_one(
        self, node: fx.Node, axis: int
    ) -> list[tuple[fx.Node, int]] | None:
        """Producers to go on to, with their axis; [] once sliced; None: a boundary."""
        rank = len(shape_of(node) or ())
        src = node.args[0] if node.args else None
        if node.op == "get_attr":
            user = next(iter(node.users))
            return [] if self._sliced_attr(node, axis, self.out_sel, user) else None
        if node.op == "call_module":
            m = self.gm.get_submodule(str(node.target))
            if not isinstance(src, fx.Node):
                return None
            if is_unary(node, self.gm):
                return [(src, axis)]
            pc = per_channel_size(m)
            if pc and pc[0] == self.c and _where(pc[1], axis, rank):
                self._swap_module(node, slice_per_channel(m, self.out_sel))
                return [(src, axis)]
            mix = mixing_channels(m)
            if mix and mix[1] == self.c and _where(mix[2], axis, rank):
                self._swap_module(node, slice_mixing(m, None, self.out_sel))
                self.record.sliced.append(node.name)
                return []
            if type(m).__name__ == "Permute":
                return [(src, m.dims[axis])]
            return None
        if is_unary(node, self.gm):
            return [(src, axis)] if isinstance(src, fx.Node) else None
        if is_binary(node):
            return self._channel_operands(node, axis)
        if is_layout(node, self.gm) and isinstance(src, fx.Node):
            moved = _layout(node, src, axis, forward=False, new=self.out_sel)
            return None if moved is None else [(src, moved)]
        call = attention_call(node, self.gm)
        if call is not None:
            return [] if self._attention_writes(call, axis, rank) else None
        name = op_name(node)
        if name in _NORM_FUNCS and isinstance(src, fx.Node) and axis == rank - 1:
            return [(src, axis)] if self._norm(node, self.out_sel) else None
        if name in MIX_FUNCS:
            stream = node.args[STREAM_ARG.get(name, 0)]
            if isinstance(stream, fx.Node) and self._mix(
                node, stream, axis, rank, self.out_sel, False
            ):
                return []
        return None

    def _attention_writes(self, call: fx.Node, axis: int, rank: int) -> bool:
        """``attn(...)[0]`` on the output path: the output projection loses output
        channels, keeping any input slice the forward walk gave the call."""
        m = self.gm.get_submodule(str(call.target))
        if attention_width(m) != self.c or axis != rank - 1:
            return False
        new = sliced_attention(m, None, self.out_sel)
        if new is None:
            return False
        self._swap_module(call, new)
        if call.name not in self.record.sliced:
            self.record.sliced.append(call.name)
        return True

    def _narrow_after(
        self, node: fx.Node, axis: int, on_path: set[fx.Node], from_in: bool = False
    ) -> None:
        """Readers on the output path get `node`'s value narrowed to `out_sel`."""
        with self.graph.inserting_after(node):
            value = node
            if from_in:  # a stream-indexed value: back to all C channels first
                value = self.graph.call_function(
                    pad_channels, (node, axis, self.c, self.in_sel[0])
                )
        with self.graph.inserting_after(value):
            cut = self.graph.call_function(
                narrow_channels, (value, axis, *self.out_sel)
            )
        for reader in on_path:
            reader.replace_input_with(node, cut)
        self.record.narrowed.append(node.name)


def _is_size_read(node: fx.Node) -> bool:
    """``x.size()``, ``x.size(d)``, ``x.shape``, ``aten.sym_size.int(x, d)``."""
    name = op_name(node)
    if name == "getattr":
        return len(node.args) == 2 and node.args[1] == "shape"
    return name in ("size", "sym_size") and not node.kwargs


def _is_param(gm: fx.GraphModule, attr: fx.Node) -> bool:
    return str(attr.target) in dict(gm.named_parameters())


def _where(where: str, axis: int, rank: int) -> bool:
    return axis == (1 if where == "first" else rank - 1)


def _layout(node: fx.Node, src: fx.Node, axis: int, *, forward: bool, new: Sel) -> Any:
    """Where a permute / transpose / view moves the channel axis (forward: from `src`
    to `node`; backward: from `node` to `src`), editing a literal size C in a view's
    shape to the restricted size. None where the channel axis does not survive."""
    name = op_name(node)
    rank_in = len(shape_of(src) or ())
    if name == "permute":
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
        dims = [d % rank_in for d in dims]  # type: ignore[union-attr]
        return dims.index(axis) if forward else dims[axis]
    if name in ("transpose", "t"):
        d0, d1 = (
            (0, 1) if name == "t" else (node.args[1] % rank_in, node.args[2] % rank_in)
        )
        return {d0: d1, d1: d0}.get(axis, axis)
    a_shape, b_shape = shape_of(src), shape_of(node)
    if a_shape is None or b_shape is None:
        return None
    if not forward:
        a_shape, b_shape = b_shape, a_shape
    c = a_shape[axis]
    inner = math.prod(a_shape[axis + 1 :])
    for k, size in enumerate(b_shape):
        if size == c and math.prod(b_shape[k + 1 :]) == inner:
            target_k = k if forward else axis
            return k if _edit_size(node, target_k, c, new[1] - new[0]) else None
    return None


def _edit_size(node: fx.Node, k: int, c: int, n: int) -> bool:
    """Rewrite a view/reshape whose shape argument spells the channel count."""
    if op_name(node) not in ("view", "reshape", "_unsafe_view"):
        return True  # flatten / unsqueeze / squeeze carry no sizes
    args = list(node.args)
    packed = len(args) == 2 and isinstance(args[1], list | tuple)
    sizes = list(args[1]) if packed else args[1:]
    if k >= len(sizes) or isinstance(sizes[k], fx.Node):
        return False
    if sizes[k] == c:
        sizes[k] = n
    elif sizes[k] != -1:
        return False
    node.args = (args[0], sizes) if packed else (args[0], *sizes)
    return True
