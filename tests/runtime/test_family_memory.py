"""Peak memory of a 24-block stage of every family against storing mode, measured as
the VmHWM growth of a fresh process (tests/runtime/peak_family.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.families import NAMES

ROOT = Path(__file__).resolve().parents[2]


def peak(name: str, n: int, mode: str) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "tests.runtime.peak_family", name, str(n), mode],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    return int(out.stdout.strip())


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_peak_memory_of_24_blocks_at_most_35_percent_of_storing(name: str) -> None:
    reversible, storing = peak(name, 24, "reversible"), peak(name, 24, "storing")
    # Storing mode keeps ~6 MiB of activations per block (~140 MiB at 24 blocks).
    assert storing > 80 * 2**20, storing
    assert reversible < 0.35 * storing, (reversible / 2**20, storing / 2**20)
