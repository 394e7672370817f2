"""Every benchmark script runs end to end in its smallest form, so that none can rot
unnoticed between the sessions that measure with it (gpu.py needs no GPU here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

STAGE = ["--methods", "storing,revcompile", "--ns", "4", "--steps", "1"]
STAGE += ["--patience", "0"]  # no waiting for a quiet machine
FIDELITY = ["--quick", "--markdown", "--models", "preact", "--couplings", "additive"]
RUNS = {
    "branch_cost": (["branch_cost.py"], "ViT attention"),
    "stage": (
        ["stage.py", *STAGE],
        "revcompile:",  # its float64 check against storing mode
    ),
    "models": (["models.py", "--quick", "--no-search", "--steps", "1"], "quick (8)"),
    "gpu": (["gpu.py", "--device", "cpu", "--quick"], "revcompile"),
    # One example run: the table row says it ran and converted.
    "fidelity": (["fidelity.py", *FIDELITY], "| additive | 5 of 8 |"),
    # Three zoo models, 90 training steps; the unguarded gradient check passed.
    "fixed_point": (["fixed_point.py", "--quick", "--markdown"], "(target 1e-4): ok"),
    # 8 steps at 8 x 8; every eligible block converted with init="fixup".
    "fixup": (["fixup.py", "--quick", "--markdown"], "converted_of_eligible 5 of 5"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_benchmark_runs(name: str) -> None:
    args, expected = RUNS[name]
    proc = subprocess.run(
        [sys.executable, *args], cwd=BENCHMARKS, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert expected in proc.stdout
    assert "FAILED" not in proc.stdout
