"""`ReversibleStage`: a chain of couplings whose backward rebuilds its activations."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from revcompile.errors import ConversionError
from revcompile.runtime.coupling import AdditiveCoupling, Recorder, keyed_call
from revcompile.runtime.function import TENSOR, ReversibleFunction
from revcompile.runtime.mode import is_storing

STREAMS = ("auto", "input")

# Note [Float64 stream]
# Under autocast (or with a bfloat16/float16 input) F and G compute in low precision,
# and a stream kept in that precision, or even in float32, is rebuilt with rounding
# error: a rebuilt value that lands on the other side of a bfloat16 rounding boundary
# changes what F computes in the recompute, and the error compounds from coupling to
# coupling (we measured 18% input-gradient error at 32 BasicBlock couplings with a
# float32 stream under CPU bfloat16 autocast). With stream="auto" the stage adds and
# subtracts in float64 and hands F and G their input cast back to the input dtype: F
# and G outputs have at most 24 significant bits, so the float64 sums are exact and the
# stream is rebuilt bit for bit. The cost is one float64 stage output saved for
# backward (4x a bfloat16 one) and float64 elementwise adds; float32 training without
# autocast is unchanged. stream="input" keeps the input dtype.


class ReversibleStage(nn.Module):
    """Couplings applied in order to the two channel halves of ``x``.

    ``stage(x, *context)`` splits ``x`` along `dim` into ``(x1, x2)`` (sizes
    `split_sizes`, default ``(C // 2, C - C // 2)``), applies each coupling, and joins
    the halves again. Context tensors are passed unchanged to every F and G.

    In training (grad enabled, something requires grad) the stage stores only its output
    and the context; backward rebuilds the rest (Note [Why a stage stores only its
    output] in function.py). Under `torch.no_grad()`, or when nothing needs a gradient,
    it is a plain forward. Under `revcompile.storing_activations()` it runs the same
    couplings with plain autograd.

    Example:
        >>> coupling = AdditiveCoupling(nn.Linear(8, 8), nn.Linear(8, 8))
        >>> stage = ReversibleStage([coupling], dim=-1)
        >>> stage(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        couplings: Iterable[AdditiveCoupling],
        dim: int = 1,
        split_sizes: Sequence[int] | None = None,
        stream: str = "auto",
    ) -> None:
        super().__init__()
        self.couplings = nn.ModuleList(couplings)
        if len(self.couplings) == 0:
            raise ConversionError("ReversibleStage needs at least one coupling.")
        if split_sizes is not None and (len(split_sizes) != 2 or min(split_sizes) < 1):
            raise ConversionError(
                f"split_sizes must be two positive sizes (x1, x2), got {split_sizes!r}."
            )
        if stream not in STREAMS:
            raise ConversionError(f"stream={stream!r}: choose one of {STREAMS}.")
        self.dim = dim
        self.split_sizes = tuple(split_sizes) if split_sizes is not None else None
        self.stream = stream

    def describe(self) -> str:
        """A short name for messages: the class, coupling count and split."""
        return (
            f"ReversibleStage({len(self.couplings)} couplings, dim={self.dim}, "
            f"split={self.split_sizes or 'even'})"
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, split_sizes={self.split_sizes}, stream={self.stream!r}"

    def sizes(self, channels: int) -> tuple[int, int]:
        if self.split_sizes is None:
            if channels < 2:
                raise ConversionError(
                    f"{self.describe()} got {channels} channel(s) along dim "
                    f"{self.dim}; a coupling needs at least 2 to split. Check `dim`."
                )
            return channels // 2, channels - channels // 2
        if sum(self.split_sizes) != channels:
            raise ConversionError(
                f"{self.describe()} got {channels} channels along dim {self.dim}, but "
                f"split_sizes {self.split_sizes} add up to {sum(self.split_sizes)}."
            )
        return self.split_sizes  # type: ignore[return-value]

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # (B, C, ...) -> (B, c1, ...), (B, c2, ...): views, never copies of x.
        c1, c2 = self.sizes(x.shape[self.dim])
        x1, x2 = torch.split(x, [c1, c2], dim=self.dim)
        return x1, x2

    def join(self, x1: Tensor, x2: Tensor) -> Tensor:
        return torch.cat([x1, x2], dim=self.dim)

    def stream_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the couplings add and subtract in (Note [Float64 stream])."""
        if self.stream == "input" or x.device.type == "mps":  # mps has no float64
            return x.dtype
        low = x.dtype in (torch.float16, torch.bfloat16)
        if low or torch.is_autocast_enabled(x.device.type):
            return torch.float64
        return x.dtype

    # Note [Stages under torch.compile]
    # Dynamo cannot trace through the reconstructing autograd.Function (its forward
    # captures RNG state, its backward calls autograd.grad on modules), and trying
    # costs several graph breaks per coupling. Excluded whole, a stage is one graph
    # break: the model around it compiles, the stage runs eagerly and keeps its
    # memory behaviour.
    @torch.compiler.disable
    def forward(self, x: Tensor, *context: Any) -> Tensor:
        params = [p for p in self.parameters() if p.requires_grad]
        tensors = [c for c in context if isinstance(c, Tensor)]
        needs_grad = (
            x.requires_grad or bool(params) or any(t.requires_grad for t in tensors)
        )
        self._refuse_sharded_couplings()
        stream = self.stream_dtype(x)
        compute = None if stream == x.dtype else x.dtype
        xs = x if compute is None else x.to(stream)
        if is_storing() or not torch.is_grad_enabled() or not needs_grad:
            y = self.run_couplings(xs, context, None, compute)
        else:
            template = tuple(TENSOR if isinstance(c, Tensor) else c for c in context)
            y = ReversibleFunction.apply(
                self, template, len(tensors), compute, xs, *tensors, *params
            )
        return y if compute is None else y.to(compute)

    def _refuse_sharded_couplings(self) -> None:
        """FSDP2 gathers a module's parameters in its forward hooks; the stage runs
        and rebuilds couplings without calling them, so shard the whole stage."""
        sharded = [
            i
            for i, c in enumerate(self.couplings)
            if any(type(m).__name__.startswith("FSDP") for m in c.modules())
        ]
        if sharded:
            raise ConversionError(
                f"{self.describe()}: couplings {sharded} are sharded with fully_shard. "
                "A reversible stage re-runs F and G in backward outside their forward "
                "hooks, so FSDP must gather the stage's parameters as one unit: call "
                "fully_shard(stage) on the ReversibleStage, not on its couplings."
            )

    def inverse(self, y: Tensor, *context: Any) -> Tensor:
        """The stage input that `forward` maps to ``y`` (exact up to rounding)."""
        stream = self.stream_dtype(y)
        compute = None if stream == y.dtype else y.dtype
        ys = y if compute is None else y.to(stream)
        x = self.run_inverse(ys, context, None, compute)
        return x if compute is None else x.to(compute)

    def run_couplings(
        self,
        x: Tensor,
        context: Sequence[Any],
        recorder: Recorder = None,
        compute: torch.dtype | None = None,
    ) -> Tensor:
        """Forward through every coupling; `recorder` (an `RngTape` method) sees each
        F and G call under the key ``(coupling index, "F" | "G")``; F and G get their
        input cast to `compute` when the stream is wider."""
        x1, x2 = self.split(x)
        for i, c in enumerate(self.couplings):
            x1, x2 = c.step(x1, x2, context, keyed_call(recorder, i, compute))
        return self.join(x1, x2)

    def run_inverse(
        self,
        y: Tensor,
        context: Sequence[Any],
        recorder: Recorder = None,
        compute: torch.dtype | None = None,
    ) -> Tensor:
        """Inverse through every coupling, last first; as in `run_couplings`."""
        y1, y2 = self.split(y)
        for i in reversed(range(len(self.couplings))):
            y1, y2 = self.couplings[i].inverse_step(
                y1, y2, context, keyed_call(recorder, i, compute)
            )
        return self.join(y1, y2)
