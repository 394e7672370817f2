"""One FSDP2 rank (gloo, CPU): a step of a converted nanoGPT on its part of a batch.

Usage: python -m tests.convert.fsdp_worker RANK WORLD OUT (stage|coupling)
Writes the full parameters after the step to OUT (rank 0), or the error it raised.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import revcompile
from tests.models import NanoGPT


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    model = NanoGPT(layers=2, dropout=0.0).double()
    return revcompile.convert(model, (torch.randint(0, 64, (2, 8)),))


def batch() -> torch.Tensor:
    return torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1))


def main() -> None:
    rank, world, out, unit = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = build()
    kind = (
        revcompile.ReversibleStage if unit == "stage" else revcompile.AdditiveCoupling
    )
    for m in list(model.modules()):
        if isinstance(m, kind):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per_rank = 4 // world
    idx = batch()[rank * per_rank : (rank + 1) * per_rank]
    try:
        model(idx).square().mean().backward()
    except revcompile.ConversionError as e:
        if rank == 0:
            torch.save(str(e), out)
        return
    opt.step()
    full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(full, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter teardown: gloo's and FSDP's C++ threads can abort it
    # ("terminate called without an active exception") after the work is saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
