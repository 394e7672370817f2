"""Peak memory and step time of one reversible stage against its alternatives.

    python benchmarks/stage.py [--quick] [--methods a,b] [--ns 4,8] [--steps K]

A stage of N BasicBlock-style couplings (C = 64 split 32 + 32; F and G are
conv-BN-ReLU-conv-BN on 32 channels; input 32 x 64 x 32 x 32 float32) run as:

  storing     the same couplings under plain autograd (the baseline of every ratio)
  residual    N ordinary BasicBlocks on 64 channels: about 2x the couplings' FLOPs
  checkpoint  the same couplings, `torch.utils.checkpoint` around each one
  revcompile  `revcompile.ReversibleStage`
  memcnn / revlib / revtorch   the same F and G modules, when the library is installed

Each (method, N) runs in a fresh process (``--worker METHOD N``, 2 torch threads) so
that one measurement's allocations and peak cannot leak into the next. Memory: growth
of peak RSS (VmHWM, reset just before) over one forward+backward, after a warm-up on a
tiny input, with MALLOC_MMAP_THRESHOLD_=65536 so that RSS follows live tensors; plus
the bytes autograd saves for backward. Time: median wall and CPU time of --steps
steps after a warm-up, with the allocator back in its usual regime and OpenMP threads
waiting passively; a step during which other processes used the cores is retried (the
machine this was written on is shared; CPU time is the figure that such sharing
disturbs least). --paired also times every method side by side in one process, and
"storing + 1 forward": the floor of any method that recomputes the forward.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from machine import (
    MIB,
    heap_allocation,
    peak_rss_bytes,
    reset_peak,
    rss_bytes,
    timed,
    wait_quiet,
)
from stage_models import (
    CHANNELS,
    METHODS,
    OPTIONAL,
    build,
    check,
    loss_weight,
    saved_counter,
    step,
)
from tables import table

ROOT = Path(__file__).resolve().parents[1]
BATCH, SIZE, THREADS = 32, 32, 2
FLOOR = "storing + 1 forward"


def worker(method: str, n: int, steps: int) -> dict[str, Any]:
    warnings.filterwarnings("ignore")  # memcnn's torch.cuda.amp deprecation notices
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model, reference = build(method, n)
    model.train()
    err = check(model, reference) if reference is not None else None
    # Warm up on a tiny input: kernels, thread pools and library imports cost one-off
    # memory that is not activation memory and must precede the baseline.
    step(model, torch.randn(4, CHANNELS, 8, 8, requires_grad=True))
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, requires_grad=True)
    loss_weight(x.shape, x.dtype)  # the loss's constant, not activation memory
    pack, seen = saved_counter(model)
    before = rss_bytes()
    reset_peak()
    step(model, x, pack=pack)
    peak = peak_rss_bytes() - before
    heap_allocation()
    step(model, x)  # warm-up: the heap grows to its working size, untimed
    return {
        "method": method,
        "n": n,
        "peak": peak,
        "saved": sum(seen.values()),
        "err": err,
        **timed(lambda: step(model, x), steps),
    }


def paired_worker(methods: list[str], n: int, rounds: int) -> list[dict[str, Any]]:
    """Every method in one process, one step each per round (in rotating order), each
    step's time divided by storing mode's in the same round; medians over rounds.
    Steps side by side share whatever load the machine is under, so these ratios
    hold up where absolute times on a shared machine do not."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    heap_allocation()  # no memory measured here
    models = {m: build(m, n)[0] for m in methods}
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, requires_grad=True)
    for model in models.values():
        step(model, x)  # warm-up
    ratios: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    for r in range(rounds):
        took = {}
        for m in methods[r % len(methods) :] + methods[: r % len(methods)]:
            cpu0, t0 = time.process_time(), time.perf_counter()
            step(models[m], x)
            took[m] = (time.perf_counter() - t0, time.process_time() - cpu0)
        # The floor of any exact-recompute method: storing mode plus one more
        # forward (RevNet's backward runs F and G again; checkpoint does too).
        cpu0, t0 = time.process_time(), time.perf_counter()
        with torch.no_grad():
            models["storing"](x)
        took[FLOOR] = (
            took["storing"][0] + time.perf_counter() - t0,
            took["storing"][1] + time.process_time() - cpu0,
        )
        for m in [*methods, FLOOR]:
            ratios.setdefault(m, []).append(
                (took[m][0] / took["storing"][0], took[m][1] / took["storing"][1])
            )
    return [
        {
            "method": m,
            "n": n,
            "paired_time": statistics.median(w for w, _ in ratios[m]),
            "paired_cpu": statistics.median(c for _, c in ratios[m]),
        }
        for m in [*methods, FLOOR]
    ]


def measure(method: str, n: int, *options: str) -> list[dict[str, Any]]:
    """Run ``--worker METHOD N *options`` in a fresh process; its result rows."""
    env = {
        **os.environ,
        # Large blocks from mmap go back to the OS when freed: RSS follows live tensors.
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(THREADS),
        # Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine a
        # spinning thread fights other processes for the core its partner needs.
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    cmd = [sys.executable, __file__, "--worker", method, str(n), *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        return [{"method": method, "n": n, "error": lines[-1][:200]}]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out if isinstance(out, list) else [out]


def ratio_only(v: float) -> str:
    return f"{v:.2f}x"


TABLES: list[tuple[str, str, Callable[[float], str]]] = [
    ("Peak fwd+bwd memory, MiB (ratio to storing)", "peak", lambda v: f"{v / MIB:.0f}"),
    ("Saved for backward, MiB (hook-visible)", "saved", lambda v: f"{v / MIB:.0f}"),
    ("Median step time, s (ratio to storing)", "time", lambda v: f"{v:.3f}"),
    ("Median CPU time per step, s (ratio to storing)", "cpu", lambda v: f"{v:.3f}"),
    ("Paired step time, ratio to storing (--paired)", "paired_time", ratio_only),
    ("Paired CPU time, ratio to storing (--paired)", "paired_cpu", ratio_only),
]


def render(rows: list[dict[str, Any]], ns: list[int], markdown: bool) -> None:
    """One method x N table per quantity, each cell with its ratio to storing mode
    at the same N; then the correctness checks and any failures."""
    by = {(r["method"], r["n"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def cell(m: str, n: int, key: str, unit: Callable[[float], str]) -> str:
        r, base = by.get((m, n), {}), by.get(("storing", n), {}).get(key)
        if "error" in r:
            return "failed"
        if key not in r:
            return "-"
        mark = "*" if key == "time" and r.get("disturbed", 0) < 0 else ""
        text = f"{unit(r[key])}{mark}"
        if unit is ratio_only or not base:
            return text
        return f"{text} ({r[key] / base:.2f}x)"

    label = {m: m + " (2x FLOPs)" if m == "residual" else m for m in methods}
    header = ["method", *(f"N = {n}" for n in ns)]
    for title, key, unit in TABLES:
        if not any(key in r for r in rows):
            continue
        shown = [m for m in methods if any(key in by.get((m, n), {}) for n in ns)]
        body = [[label[m], *(cell(m, n, key, unit) for n in ns)] for m in shown]
        table(title, body, header, markdown)
    print(
        "\nmax relative error vs storing, float64 (output, input and parameter grads):"
    )
    for m in methods:
        errs = [r["err"] for r in rows if r["method"] == m and r.get("err") is not None]
        why = {"storing": "the reference", FLOOR: "a time, not a method"}.get(
            m, "a different function"
        )
        print(f"  {m}: {max(errs):.1e}" if errs else f"  {m}: - ({why})")
    if any(r.get("disturbed", 0) < 0 for r in rows):
        print("* timed while other processes kept using the cores: unreliable")
    for r in rows:
        if "error" in r:
            print(f"FAILED {r['method']} N = {r['n']}: {r['error']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="N = 4, 16 and 2 timed steps")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--ns", help="comma-separated stage depths (default 4,8,16,32)")
    p.add_argument("--steps", type=int, help="timed steps per measurement (default 3)")
    p.add_argument(
        "--patience",
        type=float,
        default=30,
        help="seconds to wait for other processes to go quiet before each worker",
    )
    p.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="also time all methods side by side in one process, ROUNDS rounds per N "
        "(robust to other processes sharing the machine)",
    )
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    p.add_argument("--json", type=Path, help="also write raw results here")
    args = p.parse_args()
    steps = args.steps or (2 if args.quick else 3)
    if args.worker and args.worker[0] == "paired":
        methods = args.methods.split(",")
        print(json.dumps(paired_worker(methods, int(args.worker[1]), args.paired)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), steps)))
        return
    ns = [int(v) for v in args.ns.split(",")] if args.ns else None
    ns = ns or ([4, 16] if args.quick else [4, 8, 16, 32])
    methods = args.methods.split(",") if args.methods else list(METHODS)
    if "storing" not in methods:
        methods.insert(0, "storing")  # every ratio is to storing mode
    for m in [m for m in methods if m in OPTIONAL]:
        if importlib.util.find_spec(m) is None:
            print(f"{m}: not installed, skipped")
            methods.remove(m)
    print(
        f"torch {torch.__version__}, {THREADS} threads, batch {BATCH}, "
        f"{CHANNELS} x {SIZE} x {SIZE}, float32, {steps} timed steps"
    )
    rows = []
    for n in ns:
        for m in methods:
            t0 = time.perf_counter()
            if not wait_quiet(args.patience):
                print("  (machine busy: measuring anyway)")
            rows += measure(m, n, "--steps", str(steps))
            note = f", {abs(rows[-1].get('disturbed', 0))} disturbed steps retried"
            print(f"  N = {n:2d} {m:<11} {time.perf_counter() - t0:5.1f} s{note}")
        if args.paired:
            t0 = time.perf_counter()
            by = {r["method"]: r for r in rows if r["n"] == n}
            opts = ["--methods", ",".join(methods), "--paired", str(args.paired)]
            for r in measure("paired", n, *opts):
                if "error" in r or r["method"] not in by:
                    rows.append(r)
                else:
                    by[r["method"]].update(r)
            print(f"  N = {n:2d} paired      {time.perf_counter() - t0:5.1f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    render(rows, ns, args.markdown)


if __name__ == "__main__":
    main()
