"""Tables and plot for the record benchmarks/fixup.py measures."""

from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path
from typing import Any

from tables import table


def ratio(stage: list[Any]) -> float:
    return stage[0] / stage[1]  # inf where the solve failed: nothing was rebuilt


def _its(solves: list[list[Any]]) -> str:
    done = sorted(s[1] for s in solves if s[0] is not None)
    text = "-" if not done else f"{done[0]}" + (f"-{done[-1]}" * (done[0] != done[-1]))
    failed, unreached = (sum(s[0] is v for s in solves) for v in (False, None))
    return (
        text
        + f" ({failed} failed)" * bool(failed)
        + f" ({unreached} unreached)" * bool(unreached)
    )


def report(r: dict[str, Any], md: bool) -> dict[str, Any]:
    recs, names = r["records"], r["blocks"]
    edges = [0, 1, *range(r["every"], len(recs), r["every"]), len(recs)]
    rows = []
    for a, b in itertools.pairwise(dict.fromkeys(edges)):
        win = recs[a:b]
        solves = [s for rec in win for s in rec["blocks"].values()]
        stages = [(n, s) for rec in win for n, s in rec["stages"].items()]
        rebuilt = [(n, s) for n, s in stages if math.isfinite(s[0])]
        worst = max(rebuilt, key=lambda ns: ratio(ns[1]), default=None)
        loss = [statistics.mean(rec["loss"][k] for rec in win) for k in r["test"]]
        rows.append([
            str(b) if a + 1 == b else f"{a + 1}-{b}", f"{loss[0]:.3f} / {loss[1]:.3f}",
            f"{sum(s[0] is True for s in solves)} / {len(solves)}",
            *(_its([rec["blocks"][n] for rec in win]) for n in names),
            "-" if worst is None else f"{ratio(worst[1]):.2g} ({worst[0]})",
            str(sum(s[2] for _, s in stages)),
        ])  # fmt: skip
    header = ["steps", "loss (unconverted / converted)", "solves converged", *names]
    header += ["worst rebuilt error / tolerance (stage)", "re-anchored"]
    title = (
        f"Pre-activation ResNet on digits ({r['size']} x {r['size']}), fixed_point + "
        f"fixup, {r['steps']} SGD steps (lr {r['lr']}, batch {r['batch']}, "
        f"{r['threads']} thread(s)): per block, evaluations of f in backward"
    )
    table(title, rows, header, md)

    cells = [
        [str(step), *(f"{p[n][2]:.2f} ({p[n][1] if p[n][0] else 'no'})" for n in names),
         f"{r['grad_errors'][step]:.2g}"]
        for step, p in r["probes"].items()
    ]  # fmt: skip
    title = (
        f"On a fixed batch of {r['batch']}: probe_fixed_point's contraction "
        "(evaluations) per block; the converted model's parameter gradients against "
        "the unconverted model's at the same weights"
    )
    header = ["after step", *names, "max rel. gradient error"]
    table(title, cells, header, md)

    secs = {k: statistics.median(rec["seconds"][k] for rec in recs[1:] or recs)
            for k in r["test"]}  # fmt: skip
    cells = [[kind, " / ".join(f"{a:.1%}" for a in accs), f"{secs[kind]:.3f} s",
              f"{secs[kind] / secs['unconverted']:.2f}x"]
             for kind, accs in r["test"].items()]  # fmt: skip
    header = ["model (same weights at step 0)", "test accuracy per epoch"]
    table("Accuracy and step time", cells, [*header, "median step", "ratio"], md)

    first, last = recs[0]["blocks"].values(), recs[-1]["blocks"].values()
    stages = [s for rec in recs for s in rec["stages"].values()]
    failed = {n: [rec["step"] for rec in recs if rec["blocks"][n][0] is False]
              for n in names}  # fmt: skip
    rebuilt = [s for s in stages if math.isfinite(s[0])]
    s = {
        "converted_of_eligible": f"{r['converted_blocks']} of {r['eligible']}",
        "converged_first_step": f"{sum(v[0] is True for v in first)} / {len(first)}",
        "converged_last_step": f"{sum(v[0] is True for v in last)} / {len(last)}",
        "worst_rebuilt_error": max((v[0] for v in rebuilt), default=0.0),
        "worst_rebuilt_over_tolerance": max(map(ratio, rebuilt), default=0.0),
        "re_anchored": sum(v[2] for v in stages),
        "drift_re_anchored": sum(v[2] for v in rebuilt),
        "failed_solves": sum(len(steps) for steps in failed.values()),
        "first_failure": {n: steps[0] for n, steps in failed.items() if steps},
        "steps_failed": {n: len(steps) for n, steps in failed.items() if steps},
        "logits_max_abs_diff": [r[f"{t}_max_abs_logit_diff"] for t in ("step0", "end")],
        "worst_gradient_error": max(r["grad_errors"].values()),
        "step_time_ratio": secs["converted"] / secs["unconverted"],
    }  # fmt: skip
    cells = [
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()
    ]
    print(f"\n{len(stages)} stage backwards; " + "; ".join(cells))
    return s


def plot(r: dict[str, Any], path: Path) -> bool:
    """Evaluations of f per block and guard error / tolerance per stage, by step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    recs = r["records"]
    steps = [rec["step"] for rec in recs]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for n in r["blocks"]:
        its = [v[1] if (v := rec["blocks"][n])[0] is not None else math.nan
               for rec in recs]  # fmt: skip
        top.plot(steps, its, label=n)
    top.set_ylabel("evaluations of f (cap: failed)")
    for n in dict.fromkeys(r["stage_of"].values()):
        errs = [ratio(rec["stages"][n]) if n in rec["stages"] else math.nan
                for rec in recs]  # fmt: skip
        bottom.semilogy(steps, [e if math.isfinite(e) else math.nan for e in errs],
                        label=n)  # fmt: skip
    bottom.axhline(1.0, color="k", lw=0.5)
    bottom.set(ylabel="rebuilt error / tolerance", xlabel="training step")
    for ax in (top, bottom):
        ax.legend(fontsize=7)
    fig.suptitle("fixed_point + fixup on digits: convergence through training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
