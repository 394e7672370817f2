"""The user's journey after `convert` over the zoo: torchvision, timm, Hugging Face.

    python benchmarks/zoo.py [--zoo torchvision,timm,hf] [--only a,b] [--jobs 2]
                             [--json PATH] [--resume] [--markdown] [--list]

Every model (zoo_models.py: enumerated, random weights, small inputs) runs in its own
process, so that one model's crash, leak or hang (--timeout) is that model's row. The
checks (zoo_checks.py): convert raises only RevCompileError and leaves the model
unchanged; float64 gradients equal storing mode (converted in float32, then cast);
other batch sizes and lengths; converting on a batch of one; bfloat16, float16 and
float64 casts with a training step; CPU bfloat16 autocast; a new head; state_dict
into a fresh convert, torch.save/load and deepcopy; train/eval; greedy generate.
Rows go to --json as JSON lines as they finish (--resume skips the models there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tables import table

HERE = Path(__file__).resolve().parent


def _worker(name: str) -> None:
    import warnings

    import torch
    from zoo_checks import journey
    from zoo_models import entry_named

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    entry = entry_named(name)
    print("ROW " + json.dumps(journey(entry)), flush=True)


def _run_one(name: str, timeout: float) -> dict[str, Any]:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", name], cwd=HERE, env=env,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"model": name, "convert": f"FAIL: timed out after {timeout:.0f} s"}
    rows = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if not rows:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {
            "model": name,
            "convert": f"FAIL: worker died ({proc.returncode}): {tail}",
        }
    row = json.loads(rows[-1])
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _names(zoos: tuple[str, ...]) -> list[str]:
    from zoo_models import all_entries

    return [e.name for e in all_entries(zoos)]


def summarize(rows: list[dict[str, Any]], md: bool) -> None:
    from zoo_checks import CHECKS

    built = [r for r in rows if "build" not in r]
    header = ["model", "blocks", *CHECKS]
    body = []
    for r in built:
        cells = [r["model"], r.get("blocks", "-")]
        for c in CHECKS:
            v = r.get(c, "-")
            cells.append(
                "ok"
                if v == "ok"
                else (
                    "n/a"
                    if v.startswith("n/a")
                    else ("FAIL" if v.startswith("FAIL") else v)
                )
            )
        body.append(cells)
    table(f"The journey on {len(built)} models", body, header, md)
    counts = []
    for c in CHECKS:
        ok = sum(r.get(c) == "ok" for r in built)
        na = sum(str(r.get(c, "")).startswith("n/a") for r in built)
        fail = sum(str(r.get(c, "")).startswith("FAIL") for r in built)
        skipped = len(built) - ok - na - fail  # after a failed convert
        applies = ok + fail + skipped
        share = f"{100 * ok / applies:.1f}%" if applies else "-"
        counts.append([c, str(ok), str(fail + skipped), str(na), share])
    every = sum(
        r.get("convert") == "ok"
        and all(not str(r.get(c, "")).startswith("FAIL") for c in CHECKS)
        for r in built
    )
    counts.append(["every check", str(every), str(len(built) - every), "",
                   f"{100 * every / max(len(built), 1):.1f}%"])  # fmt: skip
    table("Per check (n/a: the original cannot do it either)", counts,
          ["check", "pass", "fail", "n/a", "pass rate"], md)  # fmt: skip
    failures = [
        [r["model"], c, str(r[c])[6:]]
        for r in built for c in CHECKS if str(r.get(c, "")).startswith("FAIL")
    ]  # fmt: skip
    if failures:
        table("Failures", failures, ["model", "check", "reason"], md)
    unbuilt = [[r["model"], r["build"]] for r in rows if "build" in r]
    if unbuilt:
        title = (
            "Not in the sweep: the original does not build or run here, or is too big"
        )
        table(title, unbuilt, ["model", "why"], md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", default="torchvision,timm,hf")
    p.add_argument("--only", help="comma-separated model names (zoo:model)")
    p.add_argument("--ci", action="store_true", help="the subset CI runs")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", type=Path, help="append rows here as JSON lines")
    p.add_argument("--resume", action="store_true", help="skip the models in --json")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--list", action="store_true", help="print the model names")
    p.add_argument("--table", action="store_true", help="only summarise --json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return _worker(a.worker)
    if a.ci:  # named: no enumeration (the scans behind it take minutes uncached)
        from zoo_models import CI_SUBSET

        names = list(CI_SUBSET)
    else:
        names = a.only.split(",") if a.only else _names(tuple(a.zoo.split(",")))
    if a.list:
        print("\n".join(names))
        return None
    done: dict[str, dict[str, Any]] = {}
    if a.json and a.json.exists() and (a.resume or a.table):
        for line in a.json.read_text().splitlines():
            row = json.loads(line)
            done[row["model"]] = row
    todo = [] if a.table else [n for n in names if n not in done]
    print(f"{len(names)} models, {len(todo)} to run", file=sys.stderr)

    def one(name: str) -> dict[str, Any]:
        row = _run_one(name, a.timeout)
        fails = [c for c, v in row.items() if str(v).startswith("FAIL")]
        said = "FAIL " + ",".join(fails) if fails else "ok"
        print(
            f"{name}: {row.get('seconds', '-')} s {said}", file=sys.stderr, flush=True
        )
        if a.json:
            with a.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    with ThreadPoolExecutor(a.jobs) as pool:
        for row in pool.map(one, todo):
            done[row["model"]] = row
    summarize([done[n] for n in names if n in done], a.markdown)
    return None


if __name__ == "__main__":
    main()
