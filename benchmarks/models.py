"""Whole-model training memory and speed: original, per-block checkpoint, revcompile.

    python benchmarks/models.py [--quick] [--models resnet50,vit_b_16,gpt]
        [--methods original,checkpoint,revcompile,storing] [--cap-gib 3] [--markdown]

Models (float32, CPU, sized so that a full run takes about an hour on 2 cores):
  resnet50  torchvision resnet50, 128 x 128 images, 1000 classes, batch 32
  vit_b_16  torchvision vit_b_16(image_size=112): 7 x 7 patches + class token, batch 32
  gpt       tests/models.py NanoGPT, nanoGPT's shakespeare_char shape with 12 layers:
            d = 384, 6 heads, 256 tokens, vocabulary 65, no dropout, batch 8
  resnet50_224, resnet101_224  (not in the default run) 224 x 224 images, batch 8
Methods:
  original    the model as written
  checkpoint  torch.utils.checkpoint(use_reentrant=False) around every residual block
              (every Bottleneck, downsampling ones too; EncoderBlock; GPT Block)
  revcompile  revcompile.convert(model, example batch of 2): shape-generic
  storing     the converted model under revcompile.storing_activations(): what the
              coupling architecture costs without the reversible backward

A step: forward, cross-entropy, backward, SGD (momentum 0.9). Each (model, method,
batch) runs in a fresh process (--worker). Memory, with MALLOC_MMAP_THRESHOLD_=65536 so
that RSS follows live tensors: VmHWM over one step, reset just before it. "process" is
that peak (interpreter, torch, weights, momentum, gradients, activations); "step" its
growth over the RSS between steps (which holds weights, momentum and the previous
step's gradients): activations and temporaries. Time: median wall and CPU seconds of
--steps steps after a warm-up, in glibc's usual allocator regime. Largest batch whose
process peak stays under --cap-gib: a guess from the fixed-batch growth, x1.25 or
/1.25 per probe until bracketed, then bisection to 1/16; searched up to --max-factor
x the original's largest batch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import machine  # benchmarks/machine.py: RSS, allocator regime, neighbours
import torch
import torchvision
from tables import table
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import revcompile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.models, when run as benchmarks/models.py
from tests.models import Block, NanoGPT  # noqa: E402

THREADS, GIB = 2, 2**30
METHODS = ("original", "checkpoint", "revcompile", "storing")
SEARCHED = METHODS[:3]  # storing mode is there to explain, not to train with
Batch = tuple[Tensor, Tensor]
Result = dict[str, Any]


class Spec(NamedTuple):
    build: Callable[[], nn.Module]
    block: type[nn.Module]  # the residual block that `checkpoint` wraps
    inputs: Callable[[int], Batch]  # batch size -> (inputs, targets)
    batch: int  # the fixed batch of the side-by-side comparison


def images(size: int, n: int) -> Batch:
    return torch.randn(n, 3, size, size), torch.randint(0, 1000, (n,))


def tokens(t: int, n: int) -> Batch:
    return torch.randint(0, 65, (n, t)), torch.randint(0, 65, (n, t))


def gpt(layers: int, d: int, heads: int, t: int) -> nn.Module:
    return NanoGPT(layers=layers, d=d, heads=heads, vocab=65, block_size=t, dropout=0)


P, VIT = functools.partial, torchvision.models.vision_transformer
SPECS = {
    "resnet50": Spec(
        torchvision.models.resnet50,
        torchvision.models.resnet.Bottleneck,
        P(images, 128),
        32,
    ),
    "vit_b_16": Spec(
        P(VIT.vit_b_16, image_size=112), VIT.EncoderBlock, P(images, 112), 32
    ),
    "gpt": Spec(P(gpt, 12, 384, 6, 256), Block, P(tokens, 256), 8),
    # Issue 11's targets: the ImageNet resolution at a fine-tuning batch.
    "resnet50_224": Spec(
        torchvision.models.resnet50,
        torchvision.models.resnet.Bottleneck,
        P(images, 224),
        8,
    ),
    "resnet101_224": Spec(
        torchvision.models.resnet101,
        torchvision.models.resnet.Bottleneck,
        P(images, 224),
        8,
    ),
    # --quick: a 4-layer GPT, a smoke run of every code path in a few minutes.
    "quick": Spec(P(gpt, 4, 128, 4, 128), Block, P(tokens, 128), 8),
}


def prepare(spec: Spec, method: str) -> nn.Module:
    torch.manual_seed(0)
    model = spec.build().train()
    if method == "checkpoint":
        for m in model.modules():
            if isinstance(m, spec.block):
                # An instance attribute shadows the class's forward, so __call__ (and
                # its hooks) run the block under checkpoint. BatchNorm statistics get
                # updated twice per step this way; irrelevant to memory and time.
                m.forward = P(checkpoint, m.forward, use_reentrant=False)
    elif method in ("revcompile", "storing"):
        model = revcompile.convert(model, (spec.inputs(2)[0],), strict=True)
    return model


def step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch) -> None:
    opt.zero_grad(set_to_none=True)  # frees the previous step's gradients
    out = model(batch[0])
    loss = F.cross_entropy(out.flatten(0, -2), batch[1].flatten())
    del out  # as in a training loop: only autograd holds the logits
    loss.backward()
    opt.step()


def watchdog(cap: int, done: threading.Event) -> None:
    """Exit as soon as RSS passes `cap`: a batch that does not fit fails within its
    forward, not after a full step, and cannot push the shared machine into OOM."""
    while not done.wait(0.002):
        if (rss := machine.rss_bytes()) > cap:
            print(json.dumps({"fits": False, "peak": rss}), flush=True)
            os._exit(0)


def timed(run: Callable[[], None], steps: int) -> Result:
    """Median wall and CPU seconds (all threads) of `steps` runs. Other processes
    keep this shared 2-core machine busy (load 4 to 10): wall time varies 2-3x
    between identical runs, CPU time under OMP_WAIT_POLICY=PASSIVE within ~10%."""
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"time": statistics.median(wall), "cpu": statistics.median(cpu)}


def worker(name: str, method: str, batch: int, steps: int, cap: int) -> Result:
    torch.set_num_threads(THREADS)
    spec = SPECS[name]
    model = prepare(spec, method)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    storing = method == "storing"
    with revcompile.storing_activations() if storing else contextlib.nullcontext():
        # A tiny step first: kernels, thread pools, momentum buffers and gradients
        # are there between steps of any batch size, so they precede the baseline.
        step(model, opt, spec.inputs(2))
        data = spec.inputs(batch)
        before = machine.rss_bytes()
        machine.reset_peak()
        done = threading.Event()
        if cap:
            threading.Thread(target=watchdog, args=(cap, done), daemon=True).start()
        step(model, opt, data)
        peak = machine.peak_rss_bytes()
        done.set()  # the timing below keeps freed memory: RSS stops meaning peak
        out: Result = {"fits": peak <= cap, "peak": peak, "growth": peak - before}
        if steps:
            machine.heap_allocation()  # fresh-page faults would double step times
            step(model, opt, data)
            out |= timed(lambda: step(model, opt, data), steps)
    plan = getattr(model, "revcompile_plan", None)
    out["saved"] = plan.fraction_saved if plan is not None else None
    return out | {"params": sum(p.numel() for p in model.parameters())}


def measure(name: str, method: str, batch: int, steps: int, cap: int = 0) -> Result:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",  # freed tensors leave RSS
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(THREADS),
        # Spinning OpenMP threads on an oversubscribed machine made steps 2-10x
        # slower and erratic; sleeping at barriers makes CPU time a measure of work.
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    args = [name, method, str(batch), "--steps", str(steps), "--cap", str(cap)]
    cmd = [sys.executable, __file__, "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest_batch(name: str, method: str, cap: int, guess: int, top: int) -> int:
    """The largest batch (at most `top`) whose process peak fits under `cap`."""
    fits: dict[int, bool] = {}

    def probe(b: int) -> bool:
        if b in fits:
            return fits[b]
        r = measure(name, method, b, steps=0, cap=cap)
        fits[b] = r.get("fits", False)
        print(f"    {name} {method} {b}: {r.get('peak', 0) / machine.MIB:.0f} MiB")
        return fits[b]

    b = min(max(1, guess), top)
    while probe(b) and b < top:  # widen until bracketed
        b = min(top, max(b + 1, round(b * 1.25)))
    while not fits[b] and b > 1:
        b = max(1, min(b - 1, round(b / 1.25)))
        probe(b)
    lo = max([k for k, v in fits.items() if v], default=0)
    hi = min([k for k, v in fits.items() if not v], default=lo)
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    return lo


def report(
    names: list[str],
    methods: list[str],
    fixed: dict[tuple[str, str], Result],
    found: dict[tuple[str, str], int],
    cap: int,
    max_factor: int,
    md: bool,
) -> None:
    header = ["model (batch)", *methods]

    def ratio(v: float, base: float | None, fmt: str) -> str:
        return format(v, fmt) + (f" ({v / base:.2f}x)" if base else "")

    for title, key, fmt, unit in [
        ("Step peak, MiB above the RSS between steps", "growth", ".0f", machine.MIB),
        ("Process peak, MiB", "peak", ".0f", machine.MIB),
        ("Median step wall time, s", "time", ".2f", 1),
        ("Median step CPU time (both threads), s", "cpu", ".2f", 1),
        ("Parameters, M", "params", ".1f", 1e6),
    ]:
        rows = []
        for n in names:
            base = fixed[n, "original"].get(key)
            got = [fixed[n, m].get(key) for m in methods]
            cells = [
                ratio(v / unit, base and base / unit, fmt) if v else "-" for v in got
            ]
            rows.append([f"{n} ({SPECS[n].batch})", *cells])
        table(f"{title} (ratio to original)", rows, header, md)
    if found:
        rows = []
        for n in names:
            base = found.get((n, "original"))
            cells = []
            for m in methods:
                if (b := found.get((n, m))) is None:
                    cells.append("-")
                    continue
                at_top = m != "original" and base and b >= max_factor * base
                cells.append((">= " if at_top else "") + ratio(b, base, "d"))
            rows.append([n, *cells])
        title = f"Largest batch under a {cap / GIB:g} GiB process peak (ratio)"
        table(title, rows, ["model", *methods], md)
    for n in names:
        saved = fixed[n, methods[-1]].get("saved")
        if saved is not None:
            print(f"{n}: plan.fraction_saved = {saved:.2f}")
        for m in methods:
            if "error" in fixed[n, m]:
                print(f"{n} {m}: {fixed[n, m]['error']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "METHOD", "B"), help="-")
    p.add_argument("--quick", action="store_true", help="a 4-layer GPT, 1 GiB cap")
    p.add_argument("--models", default="resnet50,vit_b_16,gpt")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--cap-gib", type=float, help="process peak cap (default 3)")
    p.add_argument("--max-factor", type=int, default=4, help="search bound")
    p.add_argument("--steps", type=int, help="timed steps (default 3, quick 2)")
    p.add_argument("--cap", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--no-search", action="store_true", help="fixed batch only")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", type=Path, help="also write raw results here")
    p.add_argument("--load", type=Path, help="print the tables of a --json file")
    args = p.parse_args()
    steps = args.steps if args.steps is not None else 2 if args.quick else 3
    if args.worker:
        name, method, b = args.worker
        print(json.dumps(worker(name, method, int(b), steps, args.cap)))
        return
    names = ["quick"] if args.quick else args.models.split(",")
    methods = ["original", *(m for m in args.methods.split(",") if m != "original")]
    cap = int((args.cap_gib or (1 if args.quick else 3)) * GIB)
    print(f"torch {torch.__version__}, {THREADS} threads, cap {cap / GIB:g} GiB")
    fixed: dict[tuple[str, str], Result] = {}
    found: dict[tuple[str, str], int] = {}
    if args.load:
        for k, r in json.loads(args.load.read_text()).items():
            n, m = k.split("/")
            fixed[n, m] = r
            if "largest_batch" in r:
                found[n, m] = r["largest_batch"]
        return report(names, methods, fixed, found, cap, args.max_factor, args.markdown)
    for n in names:
        for m in methods:
            t0 = time.perf_counter()
            fixed[n, m] = r = measure(n, m, SPECS[n].batch, steps)
            print(f"  {n} {m}: {time.perf_counter() - t0:.0f} s, {r.get('error', '')}")
    for n in [] if args.no_search else names:
        top = 2**20
        for m in [m for m in methods if m in SEARCHED]:  # original first
            if "error" in (r := fixed[n, m]):
                continue
            # Guess: every byte of the step's growth scales with the batch.
            room = cap - (r["peak"] - r["growth"])
            guess = int(SPECS[n].batch * room / r["growth"])
            found[n, m] = b = largest_batch(n, m, cap, guess, top)
            top = max(1, args.max_factor * b) if m == "original" else top
    if args.json:
        raw = {"/".join(k): v for k, v in fixed.items()}
        for k, b in found.items():
            raw["/".join(k)]["largest_batch"] = b
        args.json.write_text(json.dumps(raw, indent=1))
    report(names, methods, fixed, found, cap, args.max_factor, args.markdown)


if __name__ == "__main__":
    main()
