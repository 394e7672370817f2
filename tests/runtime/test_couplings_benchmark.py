"""benchmarks/couplings.py runs end to end in its smallest form."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_couplings_benchmark_runs(tmp_path: Path) -> None:
    png = tmp_path / "couplings.png"
    proc = subprocess.run(
        [sys.executable, "couplings.py", "--quick", "--markdown", "--png", str(png)],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for family in ("fixed_point", "momentum (float)", "twin + guard"):
        assert f"| {family} |" in proc.stdout
    assert png.stat().st_size > 10_000
