"""`ReversibleStage`: a chain of couplings whose backward rebuilds its activations."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from revcompile.errors import ConversionError
from revcompile.runtime.couplings.base import (
    Aux,
    Carry,
    Coupling,
    Layout,
    Recorder,
    State,
    keyed_call,
    same_family,
)
from revcompile.runtime.function import TENSOR, ReversibleFunction
from revcompile.runtime.guard import ReconstructionLog, StepReconstruction
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
# stream is rebuilt bit for bit. A family that scales a branch output (hamiltonian's
# h F, midpoint's 2h f) rounds the product to the branch's dtype before adding it, so
# the same holds. The cost is the saved final state in float64 (4x a bfloat16 one) and
# float64 elementwise adds; float32 training without autocast is unchanged.
# stream="input" keeps the input dtype. Families in integer arithmetic (momentum,
# scaled: Note [Integer stream] in couplings/exact.py) are exact in every dtype.


class ReversibleStage(nn.Module):
    """Couplings of one family applied in order to the stage input.

    ``stage(x, *context)`` maps `x` to the family's state (for a splitting family
    such as additive, the two halves along `dim`, sizes `split_sizes`, default
    ``(C // 2, C - C // 2)``; for a full-width one, copies of `x`), applies each
    coupling, and maps the final state back to a tensor shaped like `x`. Context
    tensors are passed unchanged to every branch.

    In training (grad enabled, something requires grad) the stage stores only its
    final state and the context; backward rebuilds the rest (Note [Why a stage stores
    only its output] in function.py). Under `torch.no_grad()`, or when nothing needs a
    gradient, it is a plain forward. Under `revcompile.storing_activations()` it runs
    the same couplings with plain autograd.

    `guard=True` also saves the stage input, checks the input rebuilt in backward
    against it and re-anchors on it when they differ (Note [Drift guard] in guard.py);
    None takes the family's default (on only for fixed_point, which needs it).
    `stage.reconstruction_log` keeps what the guard saw.

    Example:
        >>> coupling = AdditiveCoupling(nn.Linear(8, 8), nn.Linear(8, 8))
        >>> stage = ReversibleStage([coupling], dim=-1)
        >>> stage(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        couplings: Iterable[Coupling],
        dim: int = 1,
        split_sizes: Sequence[int] | None = None,
        stream: str = "auto",
        guard: bool | None = None,
    ) -> None:
        super().__init__()
        self.couplings = nn.ModuleList(couplings)
        if len(self.couplings) == 0:
            raise ConversionError("ReversibleStage needs at least one coupling.")
        self.kind: type[Coupling] = same_family(list(self.couplings))
        if split_sizes is not None and (len(split_sizes) != 2 or min(split_sizes) < 1):
            raise ConversionError(
                f"split_sizes must be two positive sizes (x1, x2), got {split_sizes!r}."
            )
        if split_sizes is not None and not self.kind.splits:
            raise ConversionError(
                f"split_sizes={tuple(split_sizes)} given for a {self.kind.family} "
                "stage, whose couplings keep the full width: leave it None."
            )
        if stream not in STREAMS:
            raise ConversionError(f"stream={stream!r}: choose one of {STREAMS}.")
        self.dim = dim
        self.split_sizes = tuple(split_sizes) if split_sizes is not None else None
        self.stream = stream
        self.guard = self.kind.guard_default if guard is None else guard
        self.reconstruction_log = ReconstructionLog()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Stages pickled before families existed are additive and unguarded."""
        super().__setstate__(state)
        if "kind" not in state:
            self.kind = same_family(list(self.couplings))
            self.guard = self.kind.guard_default
            self.reconstruction_log = ReconstructionLog()

    @property
    def last_reconstruction(self) -> StepReconstruction | None:
        """What the last guarded (or failed) backward of this stage found."""
        return self.reconstruction_log.last

    def describe(self) -> str:
        """A short name for messages: the family, coupling count and split."""
        where = (
            f", dim={self.dim}, split={self.split_sizes or 'even'}"
            if self.kind.splits
            else ""
        )
        return (
            f"ReversibleStage({len(self.couplings)} {self.kind.family} "
            f"couplings{where})"
        )

    def extra_repr(self) -> str:
        return (
            f"family={self.kind.family!r}, dim={self.dim}, "
            f"split_sizes={self.split_sizes}, stream={self.stream!r}, "
            f"guard={self.guard}"
        )

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

    def layout(self, x: Tensor) -> Layout:
        if not self.kind.splits:
            return Layout(self.dim)
        return Layout(self.dim, self.sizes(x.shape[self.dim]))

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = self.layout(x).split(x)
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

    def tolerance(self, dtype: torch.dtype) -> float:
        """Relative reconstruction tolerance when branches compute in `dtype`."""
        return max(c.tolerance(dtype) for c in self.couplings)  # type: ignore[operator]

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
        """The stage input that `forward` maps to ``y`` (exact up to rounding), for
        the families whose output determines their state (additive, hamiltonian)."""
        if not self.kind.output_determines_state():
            raise ConversionError(
                f"{self.describe()}: a {self.kind.family} stage's output does not "
                "determine its final state, so it has no inverse from the output "
                "alone; its backward rebuilds from the saved state instead. Use "
                "revcompile.check_reconstruction(model, x) to test reconstruction."
            )
        stream = self.stream_dtype(y)
        compute = None if stream == y.dtype else y.dtype
        ys = y if compute is None else y.to(stream)
        layout = self.layout(ys)
        carry = self.kind.unpack([ys], None, layout)
        self.run_inverse(carry, [()] * len(self.couplings), context, None, compute)
        x = layout.join(self.kind.decode(carry))
        return x if compute is None else x.to(compute)

    def run_couplings(
        self,
        x: Tensor,
        context: Sequence[Any],
        recorder: Recorder = None,
        compute: torch.dtype | None = None,
    ) -> Tensor:
        """Forward through every coupling's differentiable `step`; `recorder` (an
        `RngTape` method) sees each branch call under the key ``(coupling index,
        branch name)``; branches get their input cast to `compute` when the stream
        is wider."""
        layout = self.layout(x)
        state: State = self.kind.enter(x, layout)
        for i, c in enumerate(self.couplings):
            state = c.step(state, context, keyed_call(recorder, i, compute))  # type: ignore[operator]
        return self.kind.leave(state, x, layout)

    def run_reversible(
        self,
        x: Tensor,
        context: Sequence[Any],
        recorder: Recorder = None,
        compute: torch.dtype | None = None,
    ) -> tuple[Carry, list[Aux], Tensor]:
        """The reversible forward (no graph): the final representation, what each
        coupling saved for its backward, and the stage output."""
        layout = self.layout(x)
        couplings: list[Coupling] = list(self.couplings)  # type: ignore[arg-type]
        carry = self.kind.open(self.kind.enter(x, layout), couplings)
        auxes = [
            c.forward_step(carry, context, keyed_call(recorder, i, compute))
            for i, c in enumerate(couplings)
        ]
        return carry, auxes, self.kind.leave(self.kind.decode(carry), x, layout)

    def run_inverse(
        self,
        carry: Carry,
        auxes: Sequence[Aux],
        context: Sequence[Any],
        recorder: Recorder = None,
        compute: torch.dtype | None = None,
    ) -> None:
        """Rebuild, in `carry`, the representation at the stage input."""
        for i in reversed(range(len(self.couplings))):
            self.couplings[i].inverse_step(  # type: ignore[operator]
                carry, auxes[i], context, keyed_call(recorder, i, compute)
            )
