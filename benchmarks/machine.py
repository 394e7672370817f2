"""Measuring on a small shared Linux machine: resident memory, the allocator's
regime, and whether other processes are competing for the cores."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

MIB = 2**20
QUIET = 0.1  # a step counts as undisturbed if other processes used < 0.1 core


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This address space's RSS high-water mark (VmHWM). Not ru_maxrss: Linux carries
    that across exec from the forked parent, so a worker would report its parent's."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak() -> None:
    """Lower VmHWM to the current RSS, so the next peak is that of what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def heap_allocation() -> None:
    """Serve tensors from the heap again, as glibc's default does once warmed up.

    MALLOC_MMAP_THRESHOLD_=65536 makes RSS track live tensors (freed blocks go back to
    the OS), which the peak measurement needs; but then every allocation faults in
    fresh zeroed pages, which doubles step time here and charges methods for bytes
    allocated rather than for work done. glibc's default raises its mmap threshold to
    the largest freed block (at most 32 MiB); these values are that steady state."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 * MIB)
    libc.mallopt(m_trim_threshold, 64 * MIB)


def cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process): their difference over
    a step is what other processes ran meanwhile. This machine is shared, and with
    two cores one busy neighbour stalls every parallel region of ours."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(
            int, f.readline().split()[1:8]
        )
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return user + nice + system + irq + softirq, int(fields[11]) + int(fields[12])


def others_cores(busy0: int, own0: int, wall: float) -> float:
    """Cores other processes kept busy since `cpu_ticks()` returned (busy0, own0)."""
    busy1, own1 = cpu_ticks()
    return (busy1 - busy0 - (own1 - own0)) / os.sysconf("SC_CLK_TCK") / wall


def wait_quiet(patience: float) -> bool:
    """Wait (up to `patience` seconds) for a second in which other processes use
    under `QUIET` cores."""
    deadline = time.monotonic() + patience
    while True:
        ticks = cpu_ticks()
        time.sleep(1.0)
        if others_cores(*ticks, 1.0) < QUIET:
            return True
        if time.monotonic() > deadline:
            return False


def timed(fn: Callable[[], object], steps: int) -> dict[str, Any]:
    """Median wall and CPU time (all threads) of `steps` calls of `fn`. A call during
    which other processes used `QUIET` cores or more is retried once the machine is
    quiet again, up to 3x `steps` tries in all; then the fastest are kept.
    `disturbed` counts the retried calls, negative if some kept times are disturbed."""
    quiet: list[tuple[float, float]] = []
    noisy: list[tuple[float, float]] = []
    while len(quiet) < steps and len(quiet) + len(noisy) < 3 * steps:
        if noisy:
            wait_quiet(patience=10)
        ticks, cpu0, t0 = cpu_ticks(), time.process_time(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        (quiet if others_cores(*ticks, wall) < QUIET else noisy).append((wall, cpu))
    kept = quiet if len(quiet) >= steps else sorted(quiet + noisy)[:steps]
    return {
        "time": statistics.median(w for w, _ in kept),
        "cpu": statistics.median(c for _, c in kept),
        "times": kept,
        "disturbed": len(noisy) if kept is quiet else -len(noisy),
    }
