"""FSDP2 (fully_shard) and DDP over converted models, 2 CPU processes with gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import revcompile
from tests.convert.fsdp_worker import batch, build

ROOT = Path(__file__).resolve().parents[2]


def _run(
    world: int, unit: str, out: Path, module: str = "tests.convert.fsdp_worker"
) -> object:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", module]
    procs = [
        subprocess.Popen(
            [*cmd, str(r), str(world), str(out), *([unit] if unit else [])],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_sharding_per_stage_matches_single_process(tmp_path: Path) -> None:
    sharded = _run(2, "stage", tmp_path / "params.pt")
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with revcompile.storing_activations():
        model(batch()).square().mean().backward()
    opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(sharded[name], p.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_sharding_per_coupling_is_refused_with_the_fix(tmp_path: Path) -> None:
    message = _run(1, "coupling", tmp_path / "error.pt")
    assert "fully_shard(stage)" in message


@pytest.mark.slow
def test_ddp_no_sync_accumulation_on_converted_resnet18(tmp_path: Path) -> None:
    from tests.convert.ddp_worker import build as build_resnet
    from tests.convert.ddp_worker import micro_batches

    grads = _run(2, "", tmp_path / "grads.pt", module="tests.convert.ddp_worker")
    model = build_resnet()
    with revcompile.storing_activations():
        for x, t in micro_batches():  # whole micro-batches, one process
            torch.nn.functional.cross_entropy(model(x), t).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-12)
