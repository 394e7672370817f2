"""`revcompile report SPEC`: the table, --json, and the exit codes 0 / 2 / 1."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torchvision

import revcompile
from revcompile.cli import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "revcompile.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_report_resnet50_in_a_subprocess() -> None:
    table = run("report", "torchvision:resnet50")
    assert table.returncode == 0, table.stderr
    assert "layer3.4" in table.stdout and "converts" in table.stdout
    assert "12 of 16 residual blocks in 4 stages convert" in " ".join(
        table.stdout.split()
    )
    as_json = run("report", "torchvision:resnet50", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)  # nothing but JSON on stdout
    plan = revcompile.analyze(torchvision.models.resnet50())
    assert data == json.loads(json.dumps(plan.to_dict()))
    assert [s["blocks"] for s in data["stages"]] == [2, 3, 5, 2]


def test_json_options(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["report", "torchvision:resnet18", "--json", "--min-blocks", "2",
         "--input-shape", "2,3,32,32"]
    )  # fmt: skip
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"] == {"x": [2, 3, 32, 32]}
    assert data["min_blocks"] == 2 and [s["blocks"] for s in data["stages"]] == [2]


def test_a_file_spec_with_a_factory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "mymodel.py"
    source.write_text(
        textwrap.dedent(
            """
            from torch import nn

            class Block(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.f = nn.Linear(8, 8)

                def forward(self, x):
                    return x + self.f(x)

            def build():
                return nn.Sequential(Block(), Block())
            """
        )
    )
    assert main(["report", f"{source}:build", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["blocks"] for s in data["stages"]] == [2]


@pytest.mark.parametrize(
    "spec",
    ["resnet50", "torchvision:no_such_model", "no_such_package:x", "json:nothing",
     "json:dumps", "missing/file.py:model"],
)  # fmt: skip
def test_bad_specs_exit_2_with_the_accepted_forms(
    spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", spec]) == 2
    err = capsys.readouterr().err
    assert "accepted SPEC forms" in err and "torchvision:NAME" in err


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["report"])
    assert info.value.code == 2
    assert main(["report", "torchvision:resnet18", "--input-shape", "2,x"]) == 2


def test_an_analysis_error_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["report", "torch.nn:Identity"])  # no layer to infer inputs from
    assert code == 1
    assert "example_inputs=" in capsys.readouterr().err
