"""One rank (gloo, CPU) training a step of a model around a full-width stage.

Usage: python -m tests.runtime.family_worker RANK WORLD OUT (ddp|fsdp) FAMILY
ddp: DistributedDataParallel with default arguments; rank 0 writes the gradients.
fsdp: fully_shard on the stage, then on the model; an SGD step; rank 0 writes the
full parameters after it.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from tests.runtime.families import causal_mask, stage


class Net(nn.Module):
    """A linear stem and a decoder stage; the loss is the mean square output.
    Per-token normalisation only (LayerNorm), so the whole-batch gradient is exactly
    the mean of the ranks' gradients."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.stem = nn.Linear(5, 9).double()
        self.stage = stage(name, "decoder", n=3, p=0.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.stage(self.stem(x), mask).square().mean()


def build(name: str) -> Net:
    torch.manual_seed(0)
    return Net(name)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 6, 5, generator=g, dtype=torch.float64), causal_mask(
        6, torch.float64
    )


def main() -> None:
    rank, world, out, mode, name = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        sys.argv[5],
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build(name)
    x, mask = batch()
    shard = slice(rank * 2, rank * 2 + 2)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)  # default arguments
        ddp(x[shard], mask).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.stage, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x[shard], mask).backward()
        opt.step()
        full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(full, out)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter teardown: gloo's and FSDP's C++ threads can abort it
    # ("terminate called without an active exception") after the work is saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
