"""The exceptions revcompile raises: one base class, each also a matching builtin."""

from __future__ import annotations


class RevCompileError(Exception):
    """Base class of every error revcompile raises on purpose."""


class TraceError(RevCompileError, RuntimeError):
    """A model could not be traced into a graph."""


class ConversionError(RevCompileError, ValueError):
    """A model or stage cannot be converted as asked."""


class DoubleBackwardError(RevCompileError, RuntimeError):
    """Backward through a reversible stage was asked to build a graph of its own."""


class ReconstructionError(RevCompileError, ArithmeticError):
    """A stage's inverse did not reproduce its input within tolerance."""


class CallPatternError(RevCompileError, TypeError):
    """A converted submodule was called unlike the call it was traced on."""


class InternalError(RevCompileError, RuntimeError):
    """Something revcompile did not expect went wrong; the message says what to do."""
