"""One DDP rank: train one step of a model with a ReversibleStage on half the batch."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.runtime.blocks import mlp_stage


def build() -> nn.Module:
    """Per-sample normalisation (LayerNorm), so the whole-batch gradient is exactly the
    mean of the ranks' gradients."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), mlp_stage(2, d=8, p=0.0), nn.Flatten(), nn.Linear(5 * 16, 3)
    ).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, 6, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (8,), generator=g)


def main() -> None:
    rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build()
    x, t = batch()
    ddp = DistributedDataParallel(model)  # default arguments
    shard = slice(rank * 4, rank * 4 + 4)
    loss = nn.functional.cross_entropy(ddp(x[shard]), t[shard])
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter teardown: gloo's and FSDP's C++ threads can abort it
    # ("terminate called without an active exception") after the work is saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
