"""The storing-mode switch: run reversible stages under plain autograd."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_local = threading.local()


def is_storing() -> bool:
    """Whether stages run under plain autograd (see `storing_activations`)."""
    return getattr(_local, "depth", 0) > 0


@contextmanager
def storing_activations() -> Iterator[None]:
    """Run every `ReversibleStage` with plain autograd, storing all activations.

    The couplings compute exactly the same function; only the backward differs: autograd
    keeps every intermediate instead of rebuilding it from the stage output. This is the
    reference the reversible backward is tested against, and a debugging fallback.

    Example:
        >>> with revcompile.storing_activations():
        ...     loss = model(x).sum()
        ...     loss.backward()  # ordinary autograd, ordinary memory use
    """
    # Thread-local, like grad mode: DDP and data loaders run other threads.
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
