"""DistributedDataParallel with default arguments over a reversible stage."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import revcompile
from tests.runtime.ddp_worker import batch, build

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_ranks_match_single_process(tmp_path: Path) -> None:
    out = tmp_path / "grads.pt"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.runtime.ddp_worker", str(r), "2", str(out)],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    ddp_grads = torch.load(out)

    # Single process, plain autograd, the whole batch.
    model = build()
    x, t = batch()
    with revcompile.storing_activations():
        nn.functional.cross_entropy(model(x), t).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(ddp_grads[name], p.grad, rtol=1e-9, atol=1e-12), name
