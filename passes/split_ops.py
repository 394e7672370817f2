"""What an op does to a channel axis, for the channel-split pass, in both graph forms
(symbolic trace: torch functions, Tensor methods, modules; torch.export: aten ops).

The split needs four facts: does an op act element by element (the channel axis passes
through), does it move axes (permute, view), does it hold one parameter per channel
(norms, depthwise convs: see slicing.py), or does it mix channels (conv, linear)?
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from revcompile.passes.ops import name

_UNARY = {
    "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish",
    "hardsigmoid", "hardtanh", "elu", "leaky_relu", "mish", "softplus", "selu", "celu",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout",
    "alpha_dropout", "stochastic_depth", "drop_path", "clone", "contiguous", "to",
    "type", "float", "half", "bfloat16", "double", "_to_copy", "alias", "neg", "abs",
    "exp", "square", "sqrt", "rsqrt", "erf", "clamp", "clamp_min", "clamp_max", "pow",
    "identity", "lift_fresh_copy", "detach",
}  # fmt: skip
_BINARY = {"add", "sub", "mul", "div", "true_divide", "maximum", "minimum", "rsub"}
_LAYOUT = {"permute", "transpose", "t", "view", "reshape", "flatten", "unflatten",
           "unsqueeze", "squeeze", "_unsafe_view"}  # fmt: skip
# The split treats in-place and reflected spellings like the plain op.
_ALIASES = {"iadd": "add", "imul": "mul", "isub": "sub", "truediv": "div",
            "itruediv": "div", "__add__": "add", "__mul__": "mul"}  # fmt: skip

_UNARY_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.ELU, nn.LeakyReLU, nn.Mish, nn.Softplus, nn.SELU,
    nn.CELU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.Identity,
)  # fmt: skip
# Per-element modules of other libraries, matched by class name so that this file
# imports neither torchvision nor timm nor transformers.
_UNARY_MODULE_NAMES = {
    "StochasticDepth", "DropPath", "GELUActivation", "NewGELUActivation",
    "FastGELUActivation", "SiLUActivation", "QuickGELUActivation", "PytorchGELUTanh",
}  # fmt: skip


def op_name(node: fx.Node) -> str:
    """'relu' for torch.relu, F.relu, Tensor.relu and aten.relu.default alike."""
    if node.op not in ("call_function", "call_method"):
        return node.op
    plain = name(node).lower()
    return _ALIASES.get(plain, plain)


def is_unary(node: fx.Node, root: nn.Module) -> bool:
    """An op that maps each element (or channel, for channel dropout) on its own."""
    if node.op == "call_module":
        m = root.get_submodule(str(node.target))
        return isinstance(m, _UNARY_MODULES) or type(m).__name__ in _UNARY_MODULE_NAMES
    return op_name(node) in _UNARY


_POOLS = {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
          "adaptive_max_pool2d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
          "max_pool1d", "max_pool2d", "max_pool3d"}  # fmt: skip
_REDUCTIONS = {"mean", "sum", "amax"}
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
)  # fmt: skip


def keeps_channels(node: fx.Node, root: nn.Module, axis: int) -> bool:
    """A pool or a reduction that acts on each channel of `axis` on its own (a
    squeeze-excite gate's average), so that slicing before it equals slicing after."""
    if node.op == "call_module":
        m = root.get_submodule(str(node.target))
        return axis == 1 and isinstance(m, _POOL_MODULES)
    if node.op not in ("call_function", "call_method"):
        return False
    op = op_name(node)
    if op in _POOLS:
        return axis == 1
    if op not in _REDUCTIONS or len(node.args) < 2:
        return False
    rank = len(shape_of(node.args[0]) or ())
    dims = node.args[1]
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if not rank or not dims or not all(isinstance(d, int) for d in dims):
        return False
    dims = [d % rank for d in dims]
    return axis not in dims and (keep or all(d > axis for d in dims))


def is_binary(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and op_name(node) in _BINARY


def is_layout(node: fx.Node, root: nn.Module) -> bool:
    return node.op in ("call_function", "call_method") and op_name(node) in _LAYOUT


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The static shape ShapeProp recorded for `node`, if any."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    return None
