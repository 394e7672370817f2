"""One DDP rank (gloo, CPU): converted resnet18, two micro-batches, the first under
no_sync. Usage: python -m tests.convert.ddp_worker RANK WORLD OUT"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel

import revcompile


def build() -> torch.nn.Module:
    """Batch norm in eval mode (frozen statistics, as when fine-tuning), so that the
    ranks' gradients average to exactly the whole batch's."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).double()
    converted = revcompile.convert(model, (torch.randn(2, 3, 32, 32).double(),))
    return converted.eval()


def micro_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(4, 3, 32, 32, generator=g).double(),
            torch.randint(0, 5, (4,), generator=g),
        )
        for _ in range(2)
    ]


def main() -> None:
    rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build()
    ddp = DistributedDataParallel(model)  # default arguments
    shard = slice(rank * 2, rank * 2 + 2)
    (x0, t0), (x1, t1) = micro_batches()
    with ddp.no_sync():  # accumulate locally, no all-reduce
        torch.nn.functional.cross_entropy(ddp(x0[shard]), t0[shard]).backward()
    torch.nn.functional.cross_entropy(ddp(x1[shard]), t1[shard]).backward()
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
