"""What each op does, as far as the analysis cares, for both graph forms.

fx symbolic tracing gives ``operator.add``, ``torch.relu``, ``x.view(...)`` and leaf
``call_module`` nodes; ``torch.export`` gives ATen overloads (``aten.add_.Tensor``).
Each question below is answered by the op's plain name (``add_``, ``relu``) so one table
serves both, plus the ATen schema where it says more (which argument is written, which
output aliases its input).
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from revcompile.passes.ir import GlueKind
from revcompile.passes.meta import tensor_info

_ADD = {"add", "add_", "iadd", "__add__", "__iadd__", "__radd__"}
# Ops that read only a tensor's metadata (shape, dtype, device), never its values.
_SHAPE_READS = {
    "size", "dim", "numel", "stride", "element_size", "is_floating_point",
    "is_contiguous", "get_device", "sym_size", "sym_numel", "sym_stride",
    "sym_storage_offset", "_assert", "_assert_tensor_metadata", "_assert_scalar",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "new_zeros", "new_ones", "new_empty", "new_full",
}  # fmt: skip
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}
_VIEWS = {
    "view", "view_as", "reshape", "reshape_as", "_unsafe_view", "permute", "transpose",
    "t", "expand", "expand_as", "flatten", "unflatten", "squeeze", "unsqueeze",
    "narrow", "select", "slice", "unbind", "split", "split_with_sizes", "chunk",
    "tensor_split", "movedim", "swapaxes", "swapdims", "as_strided", "unfold",
    "diagonal", "alias", "getitem", "__getitem__", "detach",
}  # fmt: skip
# Value-preserving when dtype, device and shape do not change; they may copy.
_NO_OPS = {
    "contiguous", "clone", "to", "type", "float", "double", "half", "bfloat16",
    "cpu", "cuda", "_to_copy", "lift_fresh_copy", "identity",
}  # fmt: skip
_DROPOUTS = {
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "feature_dropout", "native_dropout", "stochastic_depth",
}  # fmt: skip
_RANDOM = {
    "bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like", "randint",
    "randint_like", "randperm", "normal", "normal_", "uniform_", "multinomial",
    "exponential_", "geometric_", "cauchy_", "log_normal_", "random_", "poisson",
}  # fmt: skip
_ACTIVATIONS = {
    "relu", "relu6", "gelu", "silu", "hardswish", "hardtanh", "leaky_relu", "elu",
    "celu", "selu", "mish", "sigmoid", "tanh", "softplus", "hardsigmoid", "prelu",
}  # fmt: skip
_NORMS = {"layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm"}
_CHANNEL_FIRST = {
    "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "batch_norm", "group_norm",
    "instance_norm", "_native_batch_norm_legit_functional",
    "_native_batch_norm_legit_no_training", "cudnn_batch_norm",
}  # fmt: skip
_CHANNEL_LAST = {
    "linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "layer_norm", "rms_norm",
    "native_layer_norm", "scaled_dot_product_attention", "embedding",
}  # fmt: skip
_MODULE_CHANNEL_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
)
_MODULE_CHANNEL_LAST = (
    nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.MultiheadAttention, nn.Embedding,
)  # fmt: skip
_MODULE_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardtanh, nn.LeakyReLU,
    nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Hardsigmoid, nn.PReLU,
)  # fmt: skip
_MODULE_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase, nn.GroupNorm)


def name(node: fx.Node) -> str:
    """Plain op name: ``add`` for ``operator.add``, ``torch.add``, ``aten.add``."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if isinstance(target, torch._ops.OpOverload):
        return target._overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def module(node: fx.Node, gm: fx.GraphModule) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    """A short op description for messages: ``Conv2d stride 2``, ``relu_``."""
    mod = module(node, gm)
    if mod is None:
        text = name(node)
        stride = node.args[3] if text.startswith("conv") and len(node.args) > 3 else 1
    else:
        text = type(mod).__name__
        stride = getattr(mod, "stride", 1)
    strides = stride if isinstance(stride, (tuple, list)) else (stride,)
    if any(isinstance(s, int) and s != 1 for s in strides):
        text += f" stride {strides[0] if len(set(strides)) == 1 else tuple(strides)}"
    return text


def is_add(node: fx.Node) -> bool:
    """A two-tensor add with unit ``alpha``: the shape every residual join takes."""
    if node.op not in ("call_function", "call_method") or name(node) not in _ADD:
        return False
    args = node.args
    return (
        len(args) == 2
        and all(isinstance(a, fx.Node) for a in args)
        and node.kwargs.get("alpha", 1) == 1
    )


def is_shape_read(node: fx.Node) -> bool:
    """Reads only metadata of its tensor inputs, so it is not data flow."""
    if node.op == "call_module":
        return str(node.target) == "_guards_fn"  # export's input-shape guard
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _META_ATTRS
    return node.op in ("call_function", "call_method") and name(node) in _SHAPE_READS


def is_view(node: fx.Node) -> bool:
    """Its output shares its input's storage (so it costs no activation bytes)."""
    if node.op not in ("call_function", "call_method"):
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target._schema.returns:
        alias = target._schema.returns[0].alias_info
        if alias is not None and not alias.is_write:
            return name(node) not in _NO_OPS  # aten.contiguous/to may return self
    return name(node) in _VIEWS


def may_alias(node: fx.Node) -> bool:
    """Output may share the input's storage: a view, a no-op ``.to``/``contiguous``."""
    return is_view(node) or (
        node.op in ("call_function", "call_method")
        and name(node) in _NO_OPS - {"clone"}
    )


@functools.cache
def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature
        return None


def bound_argument(node: fx.Node, arg: str) -> Any:
    """The value passed for a named parameter of a Python-function call, or None."""
    if node.op != "call_function" or isinstance(node.target, torch._ops.OpOverload):
        return node.kwargs.get(arg)
    sig = _signature(node.target)  # type: ignore[arg-type]
    if sig is None:
        return node.kwargs.get(arg)
    try:
        bound = sig.bind_partial(*node.args, **node.kwargs)
    except TypeError:
        return None
    return bound.arguments.get(arg)


def mutated_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The input a node overwrites (``add_``, ``relu(inplace=True)``, ``+=``)."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    op = name(node)
    if node.op == "call_module":
        return first if getattr(module(node, gm), "inplace", False) is True else None
    if node.op == "call_method":
        return first if op.endswith("_") and not op.startswith("_") else None
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        arguments = target._schema.arguments
        alias = arguments[0].alias_info if arguments else None
        return first if alias is not None and alias.is_write else None
    if target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
        return first
    if op.endswith("_") and not op.startswith("_"):
        return first
    return first if bound_argument(node, "inplace") is True else None


def dropout_probability(node: fx.Node, gm: fx.GraphModule) -> float | None:
    """``p`` of a dropout or drop-path op, None if the node is not one."""
    mod = module(node, gm)
    if mod is not None:
        if isinstance(mod, nn.modules.dropout._DropoutNd) or is_drop_path(mod):
            return float(getattr(mod, "p", getattr(mod, "drop_prob", 0.5)))
        return None
    if node.op != "call_function" or name(node) not in _DROPOUTS:
        return None
    p = bound_argument(node, "p")
    if p is None and len(node.args) > 1:
        p = node.args[1]  # aten.dropout(input, p, train)
    return float(p) if isinstance(p, (int, float)) else 0.5


def is_drop_path(mod: nn.Module) -> bool:
    """Stochastic depth modules (torchvision's, timm's and HF's ``...DropPath``)."""
    cls = type(mod).__name__
    return cls == "StochasticDepth" or cls.endswith("DropPath")


def is_stochastic(node: fx.Node, gm: fx.GraphModule) -> bool:
    p = dropout_probability(node, gm)
    if p is not None:
        return p > 0
    if node.op in ("call_function", "call_method") and name(node) in _RANDOM:
        return True
    if node.op == "call_function" and name(node) == "scaled_dot_product_attention":
        p = bound_argument(node, "dropout_p")
        if p is None and len(node.args) > 4:
            p = node.args[4]
        return isinstance(p, (int, float)) and p > 0
    return False


def has_parameters(node: fx.Node, gm: fx.GraphModule) -> bool:
    mod = module(node, gm)
    return mod is not None and next(mod.parameters(), None) is not None


def is_parameter(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op != "get_attr":
        return False
    try:
        value = operator.attrgetter(str(node.target))(gm)
    except AttributeError:
        return False
    return isinstance(value, nn.Parameter)


def channel_first(node: fx.Node, gm: fx.GraphModule) -> bool | None:
    """True for ops with channels on dim 1 (conv, batch norm), False for ops on the
    last dim (linear, layer norm, attention), None for ops that say nothing."""
    mod = module(node, gm)
    if mod is not None:
        if isinstance(mod, _MODULE_CHANNEL_FIRST):
            return True
        if isinstance(mod, _MODULE_CHANNEL_LAST) or type(mod).__name__ == "Conv1D":
            return False  # transformers' Conv1D is a linear layer
        return None
    op = name(node)
    if op in _CHANNEL_FIRST:
        return True
    return False if op in _CHANNEL_LAST else None


def glue_kind(node: fx.Node, gm: fx.GraphModule) -> GlueKind | None:
    """What a single-input node between blocks does, or None if it is not glue."""
    data = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if data is None:
        return None
    before, after = tensor_info(data), tensor_info(node)
    if before is None or after is None or before.shape != after.shape:
        return None
    mod = module(node, gm)
    p = dropout_probability(node, gm)
    if p == 0 or isinstance(mod, nn.Identity):
        return GlueKind.IDENTITY
    if mod is not None:
        if isinstance(mod, _MODULE_ACTIVATIONS):
            return GlueKind.ACTIVATION
        if isinstance(mod, _MODULE_NORMS) or type(mod).__name__.endswith("RMSNorm"):
            return GlueKind.NORM
        return None
    op = name(node).rstrip("_")
    if op in _NO_OPS and before.dtype == after.dtype:
        return GlueKind.IDENTITY
    if op in _VIEWS:
        return GlueKind.LAYOUT
    if op in _ACTIVATIONS:
        return GlueKind.ACTIVATION
    return GlueKind.NORM if op in _NORMS else None
