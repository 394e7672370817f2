"""The reversible families side by side: memory, step time, reconstruction error
against depth, the drift guard's cost, and how far each full-width family's function
is from the residual model it replaces.

    python benchmarks/couplings.py [--quick] [--markdown] [--png PATH] [--rounds R]

Everything runs in one process, so that every ratio compares runs under the same
load. Memory: growth of peak RSS (VmHWM, lowered to the current RSS before each run)
over one forward+backward of a 24-block stage of pre-activation conv blocks (C = 32,
F and G on 16 + 16 channels for the splitting families; input 8 x 32 x 32 x 32
float32), after a warm-up on a tiny input, with MALLOC_MMAP_THRESHOLD_=65536 (the
script re-executes itself with it) so that RSS follows live tensors. Time: every
method one step per round in rotating order, each step divided by storing mode's in
the same round, median over rounds; the allocator back in its usual regime.
Reconstruction error: ``max |x - inverse(forward(x))| / max |x|`` from
check_reconstruction on stages of 8, 32 and 128 pre-norm MLP blocks (tokens 8 x 16 x
32, branch outputs scaled by 0.2 so that fixed_point's are contractive), in float32
and under CPU bfloat16 autocast; "momentum (float)" and "scaled (float)" are those
families with exact=False, the float division of momentumnet's and MEFT's couplings.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from machine import MIB, heap_allocation, peak_rss_bytes, reset_peak, rss_bytes
from tables import table
from torch import Tensor, nn

import revcompile
from revcompile.runtime.couplings import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{name: (name, {}) for name in FAMILIES},
    "momentum (float)": ("momentum", {"exact": False}),
    "scaled (float)": ("scaled", {"exact": False}),
}


class Scaled(nn.Module):
    def __init__(self, branch: nn.Module, scale: float) -> None:
        super().__init__()
        self.branch, self.scale = branch, scale

    def forward(self, x: Tensor, *context: Any) -> Tensor:
        return self.scale * self.branch(x)


def conv(c_in: int, c_out: int) -> nn.Module:
    """Pre-activation BN-ReLU-conv-BN-ReLU-conv, hidden width c_out."""
    return nn.Sequential(
        nn.BatchNorm2d(c_in),
        nn.ReLU(),
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
    )


def mlp(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(
        nn.LayerNorm(d_in),
        nn.Linear(d_in, 2 * d_in),
        nn.GELU(),
        nn.Linear(2 * d_in, d_out),
    )


def build(
    variant: str, n: int, width: int, block: str, guard: bool | None = None
) -> revcompile.ReversibleStage:
    """A stage of `n` blocks; a splitting family gets F, G on the two halves."""
    name, options = VARIANTS[variant]
    family = FAMILIES[name]
    make = conv if block == "conv" else mlp
    half = width // 2
    if family.splits:
        units: list[Any] = [(make(half, half), make(half, half)) for _ in range(n)]
    else:
        units = [make(width, width) for _ in range(n)]
    if block == "mlp" or name == "fixed_point":  # contractive small residuals
        units = [
            tuple(Scaled(m, 0.2) for m in u) if isinstance(u, tuple) else Scaled(u, 0.2)
            for u in units
        ]
    dim = 1 if block == "conv" else -1
    return revcompile.ReversibleStage(
        family.build(units, **options), dim=dim, guard=guard
    )


def step(stage: nn.Module, x: Tensor, storing: bool) -> None:
    if storing:
        with revcompile.storing_activations():
            stage(x).sum().backward()
    else:
        stage(x).sum().backward()
    stage.zero_grad(set_to_none=True)


def methods(n: int, width: int) -> dict[str, tuple[nn.Module, bool]]:
    torch.manual_seed(0)
    out: dict[str, tuple[nn.Module, bool]] = {
        "storing": (build("additive", n, width, "conv"), True)
    }
    for v in VARIANTS:
        out[v] = (build(v, n, width, "conv"), False)
    for v in ("additive", "twin", "momentum"):
        out[f"{v} + guard"] = (build(v, n, width, "conv", guard=True), False)
    return out


def memory_and_time(n: int, width: int, size: int, rounds: int) -> list[list[str]]:
    """Peak MiB and paired step time of each method, ratios to storing mode."""
    models = methods(n, width)
    x = torch.randn(8, width, size, size, requires_grad=True)
    peaks: dict[str, int] = {}
    for name, (model, storing) in models.items():
        step(model, torch.randn(2, width, 4, 4, requires_grad=True), storing)
        gc.collect()
        before = rss_bytes()
        reset_peak()
        step(model, x, storing)
        peaks[name] = peak_rss_bytes() - before
    heap_allocation()  # time in the allocator's usual regime
    names = list(models)
    for name in names:
        step(models[name][0], x, models[name][1])  # warm-up at size
    ratios: dict[str, list[float]] = {m: [] for m in names}
    for r in range(rounds):
        took = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            step(models[name][0], x, models[name][1])
            took[name] = time.perf_counter() - t0
        for name in names:
            ratios[name].append(took[name] / took["storing"])
        base = took["storing"]
    rows = []
    for name in names:
        peak = peaks[name]
        rows.append(
            [
                name,
                f"{peak / MIB:.1f}",
                f"{peak / peaks['storing']:.2f}x",
                f"{statistics.median(ratios[name]):.2f}x",
            ]
        )
    rows.append(["(storing step, s)", "", "", f"{base:.2f}"])
    return rows


def reconstruction(depths: list[int], tokens: tuple[int, int, int]) -> dict[str, Any]:
    """Relative reconstruction error per variant and depth, float32 and bf16."""
    errors: dict[str, dict[str, list[float]]] = {"float32": {}, "bf16 autocast": {}}
    # The float variants warn that they drift: that drift is what is measured here.
    warnings.simplefilter("ignore", revcompile.ReconstructionWarning)
    for variant in VARIANTS:
        for key in errors:
            errors[key][variant] = []
        for n in depths:
            torch.manual_seed(0)
            stage = build(variant, n, tokens[2], "mlp")
            x = torch.randn(*tokens)
            scale = x.abs().max().item()
            (r,) = revcompile.check_reconstruction(stage, x, atol=float("inf"))
            errors["float32"][variant].append(r.max_abs_error / scale)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                (r,) = revcompile.check_reconstruction(stage, x, atol=float("inf"))
            errors["bf16 autocast"][variant].append(r.max_abs_error / scale)
    return errors


def residual_distance(
    depths: list[int], tokens: tuple[int, int, int]
) -> list[list[str]]:
    """``|y - h_N| / |h_N - x|`` for the full-width families on the blocks' own f_k,
    h_N the residual model; twin with three exits."""
    rows: dict[str, list[str]] = {}
    for n in depths:
        torch.manual_seed(0)
        fs = [mlp(tokens[2], tokens[2]) for _ in range(n)]
        x = torch.randn(*tokens)
        with torch.no_grad():
            h = x
            for f in fs:
                h = h + f(h)
            update = (h - x).norm()

            def dist(y: Tensor, h: Tensor = h, update: Tensor = update) -> str:
                return f"{((y - h).norm() / update).item():.3f}"

            x1 = x2 = x
            for i in range(0, n, 2):
                x1 = x1 + fs[i](x2)
                if i + 1 < n:
                    x2 = x2 + fs[i + 1](x1)
            exits = {
                "twin, exit x1 + x2 - x (chosen)": x1 + x2 - x,
                "twin, exit (x1 + x2) / 2 (Reformer)": (x1 + x2) / 2,
                "twin, exit x2 (last stream)": x2,
            }
            for label, y in exits.items():
                rows.setdefault(label, []).append(dist(y))
            for name in ("midpoint", "leapfrog", "momentum", "fixed_point"):
                stage = revcompile.ReversibleStage(FAMILIES[name].build(fs))
                rows.setdefault(name, []).append(dist(stage(x)))
            for g in (0.5, 0.1):
                stage = revcompile.ReversibleStage(
                    FAMILIES["momentum"].build(fs, gamma=g)
                )
                rows.setdefault(f"momentum, gamma = {g}", []).append(dist(stage(x)))
    return [[k, *v] for k, v in rows.items()]


def plot(errors: dict[str, Any], depths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-17
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (key, by) in zip(axes, errors.items(), strict=True):
        for variant, errs in by.items():
            style = "--" if "float" in variant and "(" in variant else "-"
            ax.plot(
                depths, [max(e, floor) for e in errs], style, marker="o", label=variant
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_title(f"{key} (0 plotted at {floor:g})")
        ax.set_xlabel("blocks in the stage")
    axes[0].set_ylabel("max |x - inverse(forward(x))| / max |x|")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    p.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "couplings.png")
    args = p.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        env = {
            **os.environ,
            "MALLOC_MMAP_THRESHOLD_": "65536",
            "OMP_WAIT_POLICY": "PASSIVE",
        }
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    torch.set_num_threads(2)
    n, width, size = (4, 8, 8) if args.quick else (24, 32, 32)
    depths = [4, 8] if args.quick else [8, 32, 128]
    tokens = (4, 8, 16) if args.quick else (8, 16, 32)
    rounds = 1 if args.quick else args.rounds
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"torch {torch.__version__}, 2 threads, load average {' '.join(load)}")
    t0 = time.perf_counter()
    rows = memory_and_time(n, width, size, rounds)
    table(
        f"{n}-block conv stage, 8 x {width} x {size} x {size} float32: peak memory "
        f"(VmHWM growth) and step time, ratios to storing mode ({rounds} rounds)",
        rows,
        ["method", "peak MiB", "peak / storing", "step time / storing"],
        args.markdown,
    )
    errors = reconstruction(depths, tokens)
    for key, by in errors.items():
        table(
            f"Reconstruction error, max |x - inverse(forward(x))| / max |x|, {key}",
            [[v, *(f"{e:.2g}" for e in errs)] for v, errs in by.items()],
            ["family", *(f"{d} blocks" for d in depths)],
            args.markdown,
        )
    table(
        "Distance to the residual model, |y - h_N| / |h_N - x| (same f_k, float32)",
        residual_distance([2, 8, 24] if not args.quick else [2, 4], tokens),
        [
            "family",
            *(f"{d} blocks" for d in ([2, 8, 24] if not args.quick else [2, 4])),
        ],
        args.markdown,
    )
    plot(errors, depths, args.png)
    print(f"\nwrote {args.png}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
