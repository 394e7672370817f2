"""Exactly invertible arithmetic for the families that multiply their stream by a
factor below 1 (momentum's g, scaled's l and b).

Note [Integer stream]
Undoing ``v <- g v`` divides by g, so any rounding in the forward, or difference in a
recomputed branch output, grows by 1/g per step: (1/g)^N over a stage (0.9^-128 is
7e5; MEFT's l = 0.1 gives 10^N). In floating point no scheme avoids it: a factor below
1 destroys log2(1/g) bits per element and step, and those bits must be kept somewhere
for an exact inverse (revlib's rescaled streams, ``v / g^k``, only move the loss into a
stream that grows like g^-k and drops its low bits instead). As momentumnet does
(after Maclaurin et al. 2015), the stage therefore holds its stream as integers and
keeps exactly the destroyed bits in an information buffer:

- a value x stands for ``x_int * unit``, with ``unit = 2^(e - 48)`` for the stage
  input's largest magnitude in [2^(e-1), 2^e): 48 bits below it, 14 bits of headroom
  in int64 (values beyond 2^14 times the input's largest raise, rather than wrap);
- adding a branch output adds ``round(f / unit)``, recomputed bit for bit in backward,
  so additions are undone exactly in any dtype;
- a factor is the nearest fraction n/d with d <= 1024 (exact for 0.9 = 9/10, 0.99,
  0.1 = 1/10), and ``x -> x * n / d`` is Maclaurin's exact multiply: the remainder of
  x modulo d is pushed into the buffer and n's remainder popped back, so the value
  carries below-unit noise (< n units) and the buffer grows by log2(d/n) bits a step;
  a buffer of int64 pages gets a new page every 53 / log2(d/n) steps (350 at
  g = 0.9), so memory is flat in practice and exactness holds at any depth.

Two corrections to momentumnet's code: its remainders use truncating division, which
breaks the inverse for negative values, and its x stream stays in floating point, so
the rounding of ``x + v`` re-enters v through the recomputed branch and is amplified
by 1/g all the same. Here both streams are integers and division floors. Storing mode
runs the same formulas in floating point, with the factor n/d: the two agree to about
2^-40 of the stage input's magnitude. ``exact=False`` keeps the stream in floating
point (no int64 tensors, the naive division of MEFT and revlib's couplings) and warns
when the predicted drift, eps * prod(1/g), exceeds the tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from revcompile.errors import ConversionError, ReconstructionError

PRECISION = 48  # bits of the integer stream below the stage input's largest magnitude
LIMIT = 2**62  # integer values stay below this in magnitude (14 bits of headroom)
MAX_DENOMINATOR = 1024
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Ratio:
    """A factor as a fraction ``n / d`` (d <= 1024), and as a float for storing mode."""

    n: int
    d: int

    @staticmethod
    def of(value: float, name: str) -> Ratio:
        if not value > 0:
            raise ConversionError(f"{name} must be positive, got {value}.")
        frac = Fraction(value).limit_denominator(MAX_DENOMINATOR)
        if frac.numerator == 0:
            raise ConversionError(
                f"{name}={value} rounds to 0 as a fraction with denominator "
                f"<= {MAX_DENOMINATOR}: the step would not be invertible. Use at "
                f"least {1 / MAX_DENOMINATOR:.4g}, or exact=False."
            )
        return Ratio(frac.numerator, frac.denominator)

    @property
    def value(self) -> float:
        return self.n / self.d

    @property
    def bits(self) -> float:
        """Information destroyed per element and step, in bits (0 for factors >= 1)."""
        return max(0.0, math.log2(self.d / self.n))


class InfoBuffer:
    """The bits that exact multiplies by n/d drop, kept to undo them (Maclaurin et al.
    2015): int64 pages shaped like the value; which page each multiply used, and the
    pages' bounds, are plain Python data known without looking at the values."""

    def __init__(
        self,
        pages: list[Tensor] | None = None,
        log: list[tuple[int, bool]] | None = None,
    ) -> None:
        self.pages: list[Tensor] = pages or []
        # Every entry of the top page is below `bound` (only `mul` needs it; `div`
        # restores it from the log). The log has one (bound before, new page) entry
        # per multiply not yet undone.
        self.bound = 1
        self.log: list[tuple[int, bool]] = log or []

    def mul(self, t: Tensor, r: Ratio) -> Tensor:
        """``t * n / d`` exactly invertibly (t: int64)."""
        opened = not self.pages or self.bound * r.d > INT64_MAX
        self.log.append((self.bound, opened))
        if opened:
            self.pages.append(torch.zeros_like(t))
            self.bound = 1
        # Fresh tensors only, written in place: the saved pages are never modified.
        q = torch.div(t, r.d, rounding_mode="floor")
        store = self.pages[-1] * r.d
        store += torch.remainder(t, r.d)  # push t mod d
        t = q.mul_(r.n).add_(torch.remainder(store, r.n))  # pop a remainder mod n
        self.pages[-1] = store.div_(r.n, rounding_mode="floor")
        self.bound = (self.bound * r.d - 1) // r.n + 1
        return t

    def div(self, t: Tensor, r: Ratio) -> Tensor:
        """The inverse of `mul`, on its output."""
        bound, opened = self.log.pop()
        q = torch.div(t, r.n, rounding_mode="floor")
        store = self.pages[-1] * r.n
        store += torch.remainder(t, r.n)  # push back t mod n
        t = q.mul_(r.d).add_(torch.remainder(store, r.d))  # pop the remainder mod d
        if opened:
            self.pages.pop()  # back to all zeros: drop it
        else:
            self.pages[-1] = store.div_(r.d, rounding_mode="floor")
        self.bound = bound
        return t


class FloatArith:
    """The stream in floating point: factors multiply and divide (drifts as 1/g^N)."""

    exact = False

    def encode(self, t: Tensor) -> Tensor:
        return t

    def decode(self, t: Tensor) -> Tensor:
        return t

    def add(self, t: Tensor, delta: Tensor) -> Tensor:
        return t + delta

    def sub(self, t: Tensor, delta: Tensor) -> Tensor:
        return t - delta

    def combine(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b

    def uncombine(self, a: Tensor, b: Tensor) -> Tensor:
        return a - b

    def mul(self, t: Tensor, slot: int, r: float | Ratio) -> Tensor:
        return t * _value(r)

    def div(self, t: Tensor, slot: int, r: float | Ratio) -> Tensor:
        return t / _value(r)

    def tensors(self) -> list[Tensor]:
        return []


def _value(r: float | Ratio) -> float:
    return r.value if isinstance(r, Ratio) else r


class IntArith:
    """The stream as int64 multiples of `unit` (Note [Integer stream])."""

    exact = True

    def __init__(
        self, unit: Tensor, dtype: torch.dtype, buffers: dict[int, InfoBuffer]
    ) -> None:
        self.unit = unit  # 0-dim float64, a power of two
        self.dtype = dtype  # the stream dtype values decode to
        self.buffers = buffers
        self.overflow: Tensor | None = None

    @staticmethod
    def for_input(state: tuple[Tensor, ...]) -> IntArith:
        largest = torch.stack([s.detach().abs().amax().double() for s in state]).amax()
        _, e = torch.frexp(largest)
        unit = torch.ldexp(torch.ones_like(largest), e - PRECISION)
        return IntArith(unit, state[0].dtype, {})

    def encode(self, t: Tensor) -> Tensor:
        scaled = t.to(torch.float64, copy=True).div_(self.unit)
        self._flag(~(scaled.abs() < LIMIT).all())  # also catches nan
        return scaled.round_().long()

    def decode(self, t: Tensor) -> Tensor:
        return t.double().mul_(self.unit).to(self.dtype)

    def add(self, t: Tensor, delta: Tensor) -> Tensor:
        return self._checked(t + self.encode(delta))

    def sub(self, t: Tensor, delta: Tensor) -> Tensor:
        return self._checked(t - self.encode(delta))

    def combine(self, a: Tensor, b: Tensor) -> Tensor:
        return self._checked(a + b)

    def uncombine(self, a: Tensor, b: Tensor) -> Tensor:
        return a - b

    def mul(self, t: Tensor, slot: int, r: float | Ratio) -> Tensor:
        assert isinstance(r, Ratio)
        if r.n == r.d:
            return t
        return self._checked(self.buffers.setdefault(slot, InfoBuffer()).mul(t, r))

    def div(self, t: Tensor, slot: int, r: float | Ratio) -> Tensor:
        assert isinstance(r, Ratio)
        if r.n == r.d:
            return t
        return self.buffers[slot].div(t, r)

    def _checked(self, t: Tensor) -> Tensor:
        self._flag((t.abs() >= LIMIT).any())
        return t

    def _flag(self, bad: Tensor) -> None:
        self.overflow = bad if self.overflow is None else self.overflow | bad

    def raise_if_overflowed(self, where: str) -> None:
        """One host sync per stage forward: refuse values the int64 stream cannot
        hold, rather than wrap around."""
        if self.overflow is not None and bool(self.overflow):
            raise ReconstructionError(
                f"{where}: the stream grew past 2^14 times the stage input's largest "
                "magnitude, the headroom of its exact integer representation (Note "
                "[Integer stream] in revcompile/runtime/couplings/exact.py). Build the "
                "stage with exact=False and guard=True (float arithmetic, checked in "
                "backward), or run it under `revcompile.storing_activations()`."
            )
        self.overflow = None

    def tensors(self) -> list[Tensor]:
        """The unit and every buffer page, to save for backward."""
        slots = sorted(self.buffers)
        return [self.unit, *(p for s in slots for p in self.buffers[s].pages)]

    def meta(self) -> tuple[torch.dtype, list[tuple[int, int, list[tuple[int, bool]]]]]:
        slots = sorted(self.buffers.items())
        return self.dtype, [(s, len(b.pages), list(b.log)) for s, b in slots]

    @staticmethod
    def load(tensors: Sequence[Tensor], meta: Any) -> IntArith:
        dtype, slots = meta
        unit, pages = tensors[0], list(tensors[1:])
        buffers = {}
        for slot, count, log in slots:
            buffers[slot] = InfoBuffer(pages[:count], list(log))
            pages = pages[count:]
        return IntArith(unit, dtype, buffers)


Arith = FloatArith | IntArith
