"""The memory planner's budget sweep against torch.utils.checkpoint, side by side.

    python benchmarks/budget.py [--quick] [--models resnet50,gpt24]
        [--budgets 1.0,0.5,0.25,0.1] [--fractions 0,0.5,1] [--markdown]
        [--png benchmarks/budget.png] [--json PATH]

Models (float32, CPU, 2 threads):
  resnet50  torchvision resnet50, 224 x 224 images, batch 8
  gpt24     tests/models.py NanoGPT with 24 layers, d = 256, 4 heads, 256 tokens,
            vocabulary 65, no dropout, batch 4
Rows:
  original        the model as written
  budget=B        revcompile.convert(model, example, memory_budget=B); B = "default"
                  is memory_budget=None (every eligible block reversible, kept blocks
                  checkpointed where that lowers the peak)
  checkpoint=P    torch.utils.checkpoint(use_reentrant=False) around the first P of
                  the residual blocks (Bottleneck / Block), P a fraction: the curve a
                  user gets by hand, to compare at equal memory

Each row runs in a fresh process (benchmarks/models.py's conventions: a step is
forward, cross-entropy, backward, SGD; MALLOC_MMAP_THRESHOLD_=65536; "step" is the
VmHWM growth over the RSS between steps, i.e. activations and temporaries; time is the
median CPU time of the timed steps, all threads, which on this shared machine is a
steadier measure of work than wall time). The plan's own prediction of its activation
bytes (plan.predicted_bytes / plan.original_bytes) is printed beside the measurement.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import machine  # benchmarks/machine.py
import torch
import torchvision
from models import ROOT, Batch, gpt, images, step, tokens
from tables import table
from torch import nn
from torch.utils.checkpoint import checkpoint

import revcompile
from tests.models import Block  # importable: models.py put the root on sys.path

THREADS = 2
Result = dict[str, Any]


class Spec(NamedTuple):
    build: Any
    block: type[nn.Module]
    inputs: Any  # batch size -> (inputs, targets)
    batch: int


P = functools.partial
SPECS = {
    "resnet50": Spec(
        torchvision.models.resnet50,
        torchvision.models.resnet.Bottleneck,
        P(images, 224),
        8,
    ),
    "gpt24": Spec(P(gpt, 24, 256, 4, 256), Block, P(tokens, 256), 4),
    "quick": Spec(P(gpt, 6, 64, 4, 64), Block, P(tokens, 64), 4),
}


def prepare(spec: Spec, row: str) -> nn.Module:
    torch.manual_seed(0)
    model = spec.build().train()
    kind, _, value = row.partition("=")
    if kind == "checkpoint":
        blocks = [m for m in model.modules() if isinstance(m, spec.block)]
        for m in blocks[: round(float(value) * len(blocks))]:
            m.forward = P(checkpoint, m.forward, use_reentrant=False)
    elif kind == "budget":
        budget = None if value == "default" else float(value)
        example = (spec.inputs(2)[0],)
        model = revcompile.convert(model, example, memory_budget=budget)
    return model


def worker(name: str, row: str, steps: int) -> Result:
    torch.set_num_threads(THREADS)
    spec = SPECS[name]
    model = prepare(spec, row)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step(model, opt, spec.inputs(2))  # momentum buffers, gradients, kernels
    data: Batch = spec.inputs(spec.batch)
    before = machine.rss_bytes()
    machine.reset_peak()
    step(model, opt, data)
    out: Result = {"growth": machine.peak_rss_bytes() - before}
    machine.heap_allocation()
    step(model, opt, data)
    out |= machine.timed(lambda: step(model, opt, data), steps)
    plan = getattr(model, "revcompile_plan", None)
    if plan is not None:
        out["predicted"] = plan.predicted_bytes / plan.original_bytes
        out["policies"] = {
            p: sum(b.policy.value == p for b in plan.blocks)
            for p in ("reversible", "checkpoint", "store")
        }
    return out | {"params": sum(p.numel() for p in model.parameters())}


def measure(name: str, row: str, steps: int) -> Result:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(THREADS),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    cmd = [sys.executable, __file__, "--worker", name, row, "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict[str, Result]], md: bool) -> None:
    for name, rows in results.items():
        base = rows["original"]
        lines = []
        for row, r in rows.items():
            if "error" in r:
                lines.append([row, r["error"], "", "", "", ""])
                continue
            pol = r.get("policies")
            mib, growth = r["growth"] / machine.MIB, r["growth"] / base["growth"]
            lines.append(
                [
                    row,
                    f"{mib:.0f} ({growth:.2f}x)",
                    f"{r['predicted']:.2f}x" if "predicted" in r else "-",
                    f"{r['cpu']:.2f} ({r['cpu'] / base['cpu']:.2f}x)",
                    f"{r['params'] / base['params']:.2f}x",
                    "/".join(str(pol[p]) for p in pol) if pol else "-",
                ]
            )
        header = [
            "row",
            "step peak, MiB",
            "predicted",
            "step CPU s",
            "params",
            "rev/ckpt/store",
        ]
        spec = SPECS[name]
        table(f"{name}, batch {spec.batch} (ratios to original)", lines, header, md)


def plot(results: dict[str, dict[str, Result]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2))
    for ax, (name, rows) in zip(
        [axes] if len(results) == 1 else axes, results.items(), strict=True
    ):
        base = rows["original"]
        for kind, marker in (("budget", "o-"), ("checkpoint", "s--")):
            pts = sorted(
                (r["growth"] / base["growth"], r["cpu"] / base["cpu"], row)
                for row, r in rows.items()
                if row.startswith(kind) and "error" not in r
            )
            if not pts:
                continue
            label = "revcompile memory_budget" if kind == "budget" else "checkpoint"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=label)
            for x, y, row in pts:
                ax.annotate(
                    row.split("=")[1],
                    (x, y),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.plot([1], [1], "k*", label="original")
        ax.set(
            title=name,
            xlabel="step peak / original's",
            ylabel="step CPU time / original's",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "ROW"), help="-")
    p.add_argument("--quick", action="store_true", help="a 6-layer GPT smoke run")
    p.add_argument("--models", default="resnet50,gpt24")
    p.add_argument("--budgets", default="default,1.0,0.5,0.25,0.1")
    p.add_argument("--fractions", default="0.25,0.5,1")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--png", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--load", type=Path, help="print and plot a --json file")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps)))
        return
    if args.load:
        results = json.loads(args.load.read_text())
    else:
        names = ["quick"] if args.quick else args.models.split(",")
        rows = [
            "original",
            *(f"budget={b}" for b in args.budgets.split(",")),
            *(f"checkpoint={f}" for f in args.fractions.split(",")),
        ]
        print(f"torch {torch.__version__}, {THREADS} threads")
        results = {}
        for n in names:
            results[n] = {}
            for row in rows:
                results[n][row] = r = measure(n, row, args.steps)
                print(f"  {n} {row}: {r.get('error', 'ok')}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    report(results, args.markdown)
    if args.png:
        plot(results, args.png)


if __name__ == "__main__":
    main()
