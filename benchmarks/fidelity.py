"""Every coupling family with real weights: how much of the function survives.

    python benchmarks/fidelity.py [--quick] [--markdown] [--json PATH]
        [--couplings additive,twin,...] [--models digits,preact,minilm]
        [--digits-args "--epochs 1"] [--minilm-args "--epochs 4"] [--threads N]

Runs each fine-tuning example once per coupling, in a subprocess with ``--json``:

  digits  examples/finetune_digits.py: torchvision resnet18 trained on scikit-learn's
          digits, test accuracy
  preact  the same with ``--arch preact`` (pre-activation blocks, ``x + f(x)``
          exactly: where fixed_point can keep the function)
  minilm  examples/finetune_minilm.py: all-MiniLM-L6-v2, cosine similarity of the
          sentence embeddings to the original's on held-out docstrings

Per coupling: how many blocks convert, the figure right after conversion, after
``revcompile.calibrate`` (where it applies; else why not), after the example's
fine-tuning budget, and the step's peak tensor memory and time against the original
and against the same converted model in storing mode (``Storing`` in
examples/harness.py). The digits models are pretrained once and reused through the
examples' ``--checkpoint``; the original is fine-tuned once, in the first coupling's
run, with the same budget and data order. Step times come from alternating steps in
one process (examples/harness.py), so ratios hold under a steady neighbour's load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tables import table

import revcompile

ROOT = Path(__file__).resolve().parents[1]
# name: (script, extra arguments, figure key, table title)
MODELS: dict[str, tuple[str, list[str], str, str]] = {
    "digits": ("finetune_digits.py", [], "test", "ResNet-18 on digits"),
    "preact": (
        "finetune_digits.py",
        ["--arch", "preact"],
        "test",
        "Pre-activation ResNet-18 (half width) on digits",
    ),
    "minilm": ("finetune_minilm.py", [], "similarity", "all-MiniLM-L6-v2"),
}


def run(
    model: str, coupling: str, first: bool, extra: list[str], work: Path, env: dict
) -> dict[str, Any]:
    """One example run: its --json figures, or the error; `seconds` either way."""
    script, args, _, _ = MODELS[model]
    out = work / f"{model}-{coupling}.json"
    cmd = [sys.executable, str(ROOT / "examples" / script), *args, *extra]
    cmd += ["--coupling", coupling, "--json", str(out)]
    if script == "finetune_digits.py":
        # Pretrained once per model and arguments (--size, --tiny train others).
        tag = re.sub(r"[^\w-]", "", "_".join([model, *extra]))
        cmd += ["--checkpoint", str(work / f"{tag}.pt")]
        cmd += [] if first else ["--skip-original"]  # the original tuned once
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {
            "error": f"exit {proc.returncode}: {' | '.join(tail)}",
            "seconds": seconds,
        }
    results = json.loads(out.read_text())
    results["seconds"] = seconds
    return results


def fmt(value: float | None, key: str) -> str:
    if value is None:
        return ""
    return f"{value:.2%}" if key == "test" else f"{value:.4f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def rows(model: str, runs: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per coupling; the original's fine-tuned figure from whichever run
    tuned it."""
    key = MODELS[model][2]
    tuned = next(
        (
            r["original_finetuned"][key]
            for r in runs.values()
            if "original_finetuned" in r
        ),
        None,
    )
    out = []
    for coupling, r in runs.items():
        if "error" in r:
            out.append([coupling, f"FAILED: {r['error']}", *[""] * 8])
            continue
        plan, step = r["plan"], r["step"]
        calibrated = fmt(r["calibrated"][key], key) if "calibrated" in r else "skipped"
        tuned_here = r.get("converted_finetuned", {}).get(key)
        cells = [
            coupling,
            f"{plan['converted']} of {plan['blocks']}",
            fmt(r["converted_step0"][key], key),
            calibrated,
            fmt(tuned_here, key) if tuned_here is not None else "not tuned",
            fmt(tuned, key) if key == "test" else "1.0000 (target)",
        ]
        conv, orig, storing = step["converted"], step["original"], step["storing"]
        for base in (orig, storing):
            cells.append(ratio(conv["peak_bytes"], base["peak_bytes"]))
            cells.append(ratio(conv["step_s"], base["step_s"]))
        if not r.get("finite", True):
            cells[0] += " (not finite)"
        out.append(cells)
    return out


def notes(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Why calibrate was skipped, and the blocks one family keeps that another
    converts, with each Reason (fixed_point's says how contractive the block was)."""
    kept = {c: r["plan"]["kept"] for c, r in runs.items() if "plan" in r}
    names = [{k["block"] for k in ks} for ks in kept.values()]
    common = set.intersection(*names) if names else set()
    lines = []
    for coupling, r in runs.items():
        if "calibration_skipped" in r:
            lines.append(f"{coupling}: calibrate skipped: {r['calibration_skipped']}")
        extra = [k for k in kept.get(coupling, []) if k["block"] not in common]
        if extra:
            found = (re.search(r"contraction ([\d.e+-]+)", k["why"]) for k in extra)
            blocks = ", ".join(
                k["block"] + (f" (contraction {m.group(1)})" if m else "")
                for k, m in zip(extra, found, strict=True)
            )
            kinds = ", ".join(sorted({k["kind"] for k in extra}))
            n = f"{len(extra)} block{'s' * (len(extra) > 1)}"
            lines.append(f"{coupling} keeps {n} ({kinds}): {blocks}")
        if not r.get("finite", True):
            lines.append(f"{coupling}: some figures are not finite (nan or inf)")
    return lines


HEADER = [
    "coupling", "blocks converted", "step 0", "calibrated", "fine-tuned",
    "original fine-tuned", "peak vs original", "step time vs original",
    "peak vs storing", "step time vs storing",
]  # fmt: skip


def budget(model: str, runs: dict[str, dict[str, Any]], quick: bool) -> str:
    """The figure and the fine-tuning budget, read back from the runs."""
    histories = [
        r["converted_finetuned"]["history"]
        for r in runs.values()
        if "converted_finetuned" in r
    ]
    text = "test accuracy" if MODELS[model][2] == "test" else "cosine similarity"
    text += f"; fine-tuned {len(histories[0])} epochs" if histories else ""
    return text + ("; --quick (tiny)" if quick else "")


def render(model: str, entry: dict[str, Any], md: bool) -> None:
    """The table of one model's runs, its budget and extra arguments in the title,
    then the notes."""
    runs, extra = entry["runs"], entry["args"]
    title = f"{MODELS[model][3]} ({budget(model, runs, '--tiny' in extra)})"
    if [a for a in extra if a != "--tiny"]:
        title += f", with {' '.join(extra)}"
    table(title, rows(model, runs), HEADER, md)
    for line in notes(runs):
        print(f"- {line}" if md else line)
    took = ", ".join(f"{c} {r['seconds']:.0f} s" for c, r in runs.items())
    print(f"\nWall time per run: {took}.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the examples' --tiny")
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    p.add_argument("--json", type=Path, help="write every run's figures here")
    p.add_argument("--from-json", type=Path, help="print an earlier --json's tables")
    p.add_argument("--couplings", default=",".join(revcompile.FAMILIES))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--digits-args", default="", help="extra arguments, digits+preact")
    p.add_argument("--minilm-args", default="", help="extra arguments for minilm")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS per run")
    p.add_argument("--workdir", type=Path, help="keep checkpoints here, to reuse")
    args = p.parse_args(argv)
    if args.from_json:
        for model, entry in json.loads(args.from_json.read_text()).items():
            render(model, entry, args.markdown)
        return 0
    couplings = args.couplings.split(",")
    models = args.models.split(",")
    for name, known in ((couplings, revcompile.FAMILIES), (models, MODELS)):
        unknown = sorted(set(name) - set(known))
        if unknown:
            p.error(f"unknown {unknown}; choose from {', '.join(known)}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"{os.cpu_count()} CPUs, {args.threads} threads per run, load {load}")
    everything: dict[str, Any] = {}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for model in models:
            extra = args.minilm_args if model == "minilm" else args.digits_args
            entry = {"args": shlex.split(extra) + ["--tiny"] * args.quick, "runs": {}}
            for i, coupling in enumerate(couplings):
                r = run(model, coupling, i == 0, entry["args"], work, env)
                entry["runs"][coupling] = r
                failed |= "error" in r or not r.get("finite", True)
                print(f"{model}/{coupling}: {r['seconds']:.0f} s", flush=True)
            everything[model] = entry
            render(model, entry, args.markdown)
    if args.json:  # written even when a run failed: its error is in there
        args.json.write_text(json.dumps(everything, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
