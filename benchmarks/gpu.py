"""GPU training memory and speed: original, per-block checkpoint, revcompile.

    python benchmarks/gpu.py [--dtypes fp32,bf16] [--cap-gib 16] [--markdown]
    python benchmarks/gpu.py --device cpu --quick     # smoke run of the code paths

Models at full size: resnet50 and vit_b_16 on 224 x 224 images, a 24-layer GPT-style
model (tests/models.py NanoGPT: d = 768, 12 heads, 512 tokens). Methods and the
training step are those of benchmarks/models.py. Memory is
``torch.cuda.max_memory_allocated`` over one step, reset just before it; time the
median of --steps synchronised steps after a warm-up; bf16 runs the step under
``torch.autocast``. The largest batch is found by doubling while the step's peak stays
under --cap-gib and no allocation fails.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from typing import Any

import torch
import torchvision
from models import Spec, gpt, images, prepare, step, tokens
from rich.console import Console
from rich.table import Table
from torch import nn

from tests.models import Block

GIB = 2**30
VIT = torchvision.models.vision_transformer
SPECS = {
    "resnet50": Spec(
        torchvision.models.resnet50,
        torchvision.models.resnet.Bottleneck,
        functools.partial(images, 224),
        64,
    ),
    "vit_b_16": Spec(
        VIT.vit_b_16, VIT.EncoderBlock, functools.partial(images, 224), 64
    ),
    "gpt24": Spec(
        functools.partial(gpt, 24, 768, 12, 512),
        Block,
        functools.partial(tokens, 512),
        8,
    ),
}
QUICK = {
    "gpt": Spec(
        functools.partial(gpt, 2, 64, 4, 32),
        Block,
        functools.partial(tokens, 32),
        4,
    )
}
METHODS = ("original", "checkpoint", "revcompile")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model: nn.Module,
    spec: Spec,
    batch: int,
    dtype: str,
    device: torch.device,
    steps: int,
) -> dict[str, float]:
    """Peak allocated bytes of one step and the median step time."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = (t.to(device) for t in spec.inputs(batch))
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if dtype == "bf16"
        else contextlib.nullcontext()
    )

    def one() -> None:
        with autocast:
            step(model, opt, (x, y))

    one()  # warm-up: kernels, optimizer state
    _sync(device)
    peak = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        one()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        one()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"peak": peak, "time": statistics.median(times) if times else 0.0}


def largest_batch(
    spec: Spec, method: str, dtype: str, device: torch.device, cap: float
) -> int:
    """Doubling from the fixed batch while the step fits under `cap`."""
    if device.type != "cuda":
        return 0  # no allocator peak to compare with the cap
    best, batch = 0, max(1, spec.batch // 4)
    while batch <= 64 * spec.batch:
        try:
            model = prepare(spec, method).to(device)
            peak = measure(model, spec, batch, dtype, device, steps=0)["peak"]
        except torch.OutOfMemoryError:
            break
        finally:
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if peak > cap:
            break
        best, batch = batch, batch * 2
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--models", default=",".join(SPECS))
    parser.add_argument("--cap-gib", type=float, default=16.0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or --device cpu --quick")
    specs = QUICK if args.quick else {m: SPECS[m] for m in args.models.split(",")}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table = Table(title=f"{name}, torch {torch.__version__}")
    for col in (
        "model",
        "dtype",
        "method",
        "peak GiB",
        "x orig",
        "step s",
        "x orig",
        "max batch",
    ):
        table.add_column(col)
    for model_name, spec in specs.items():
        for dtype in args.dtypes.split(","):
            rows: dict[str, Any] = {}
            for method in METHODS:
                model = prepare(spec, method).to(device)
                rows[method] = measure(
                    model, spec, spec.batch, dtype, device, args.steps
                )
                del model
                rows[method]["batch"] = largest_batch(
                    spec, method, dtype, device, args.cap_gib * GIB
                )
            base = rows["original"]
            for method, r in rows.items():
                table.add_row(
                    model_name,
                    dtype,
                    method,
                    f"{r['peak'] / GIB:.2f}",
                    f"{r['peak'] / base['peak']:.2f}" if base["peak"] else "-",
                    f"{r['time']:.3f}",
                    f"{r['time'] / base['time']:.2f}",
                    str(r["batch"]),
                )
    Console(record=True).print(table)


if __name__ == "__main__":
    main()
