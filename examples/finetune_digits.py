"""Convert a trained ResNet-18 with revcompile, then fine-tune it to recover accuracy.

scikit-learn's digits (1797 real 8x8 images shipped with scikit-learn) are upsampled to
32x32 and split once, stratified, 70/30. A torchvision resnet18 with a small-image stem
is trained from scratch on them: that is "the pretrained model". The script converts
it, reports test accuracy right after conversion and after `revcompile.calibrate`,
fine-tunes the converted model for K epochs, and fine-tunes a copy of the original for
the same K epochs with the same optimizer and data order, next to it: accuracy, peak
memory and time of a training step.

    python examples/finetune_digits.py                  # a few minutes on 2 CPU cores
    python examples/finetune_digits.py --tiny           # seconds: a smoke test
    python examples/finetune_digits.py --no-calibrate   # fine-tune the raw conversion
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from harness import (
    cost_cells,
    finish,
    measure,
    plan_summary,
    progress,
)
from hidden import halve_all, parameters
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import revcompile
from revcompile.calibrate import calibrate

Data = tuple[Tensor, Tensor]


def load_data(size: int, tiny: bool, device: torch.device) -> tuple[Data, Data]:
    """(train, test): standardised 1 x size x size images and labels, the same split
    always (--tiny: the first 64 of each)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    train, test = train_test_split(
        range(len(y)), test_size=0.3, stratify=digits.target, random_state=0
    )
    if tiny:
        train, test = train[:64], test[:64]
    tr, te = torch.tensor(train), torch.tensor(test)
    return (x[tr].to(device), y[tr].to(device)), (x[te].to(device), y[te].to(device))


def make_model() -> nn.Module:
    """resnet18 for 1x32x32 inputs: a 3x3 stride-1 stem instead of 7x7 stride 2, so
    the first residual stage works at 16x16 (after the max-pool) rather than 8x8."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
    return model


def train(
    model: nn.Module,
    data: Data,
    *,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    label: str,
    test: Data,
) -> list[dict[str, float]]:
    """SGD with momentum and a cosine schedule; per epoch: mean loss, test accuracy."""
    x, y = data
    steps = epochs * math.ceil(len(y) / batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    order = torch.Generator().manual_seed(seed)  # the same batches for every model
    history = []
    with progress() as bars:
        task = bars.add_task(label, total=steps, status="")
        for epoch in range(epochs):
            model.train()
            losses = []
            for idx in torch.randperm(len(y), generator=order).split(batch):
                idx = idx.to(y.device)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bars.update(task, advance=1, status=f"loss {loss.item():.3f}")
            acc = accuracy(model, test)
            history.append({"epoch": epoch + 1, "loss": mean(losses), "test": acc})
            bars.update(task, status=f"epoch {epoch + 1}: test {acc:.1%}")
    return history


def mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


@torch.no_grad()
def accuracy(model: nn.Module, data: Data, batch: int = 256) -> float:
    model.eval()
    x, y = data
    hits = sum(
        (model(xb).argmax(1) == yb).sum().item()
        for xb, yb in zip(x.split(batch), y.split(batch), strict=True)
    )
    return hits / len(y)


@torch.no_grad()
def loss_on(model: nn.Module, data: Data, batch: int = 256) -> float:
    """Mean cross-entropy in eval mode: the objective fine-tuning lowers."""
    model.eval()
    x, y = data
    total = sum(
        F.cross_entropy(model(xb), yb, reduction="sum").item()
        for xb, yb in zip(x.split(batch), y.split(batch), strict=True)
    )
    return total / len(y)


def reinit(converted: nn.Module, init: str) -> None:
    """Other starting points for F and G than slicing, for comparison only.

    ``identity``: the last batch norm of every F and G is zeroed, so each coupling
    starts as the identity (the pretrained branch weights stay, silenced).
    ``random``: every layer of every stage is reset to PyTorch's default init.
    """
    for stage in converted.modules():
        if not isinstance(stage, revcompile.ReversibleStage):
            continue
        for coupling in stage.couplings:
            for half in (coupling.F, coupling.G):
                norms = [
                    m
                    for m in half.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm)
                ]
                if init == "identity" and norms:
                    nn.init.zeros_(norms[-1].weight)
                    nn.init.zeros_(norms[-1].bias)
                elif init == "random":
                    for m in half.modules():
                        if hasattr(m, "reset_parameters"):
                            m.reset_parameters()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a few steps, for tests")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="default 4")
    p.add_argument("--epochs", type=int, default=None, help="K, default 2")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=None, help="image side, default 32")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    p.add_argument("--no-calibrate", action="store_true")
    p.add_argument("--calibrate-steps", type=int, default=None, help="default 50")
    p.add_argument("--calibrate-batches", type=int, default=None, help="default 4")
    p.add_argument("--calibrate-lr", type=float, default=1e-3)
    inits = ["sliced", "identity", "random", "half-hidden"]
    p.add_argument("--init", choices=inits, default="sliced")
    p.add_argument("--checkpoint", help="load the pretrained model here, or save it")
    p.add_argument("--skip-original", action="store_true", help="fine-tune only one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args(argv)
    tiny = args.tiny
    pre_epochs = args.pretrain_epochs or (1 if tiny else 4)
    epochs = args.epochs or 2
    batch = 32 if tiny else args.batch
    size = args.size or (8 if tiny else 32)  # --tiny: digits' own 8x8, 16x cheaper
    cal_steps = args.calibrate_steps if args.calibrate_steps is not None else 50
    cal_steps = min(cal_steps, 5) if tiny else cal_steps
    cal_batches = args.calibrate_batches or (2 if tiny else 4)
    dev = torch.device(args.device)
    console = Console()
    torch.manual_seed(args.seed)
    train_data, test = load_data(size, tiny, dev)
    console.print(
        f"digits: {len(train_data[1])} train / {len(test[1])} test images, "
        f"1x{size}x{size}"
    )

    model = make_model().to(dev)
    example = (train_data[0][:2],)
    # What will convert, before spending time on training: the plan needs no weights.
    console.print(plan_summary(revcompile.analyze(model, example)))
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is not None and ckpt.exists():
        model.load_state_dict(torch.load(ckpt, map_location=dev))
        pretrain: list[dict[str, float]] = []
    else:
        pretrain = train(
            model, train_data, epochs=pre_epochs, lr=0.05, batch=batch,
            seed=args.seed, label="pretrain original", test=test,
        )  # fmt: skip
        if ckpt is not None:
            torch.save(model.state_dict(), ckpt)
    model.eval()
    results: dict[str, Any] = {"pretrain": pretrain, "init": args.init}
    results["original"] = {"test": accuracy(model, test)}

    converted = revcompile.convert(model, example)
    if args.init == "half-hidden":  # the alternative default (examples/hidden.py)
        halve_all(converted)
    else:
        reinit(converted, args.init)
    results["parameters"] = {
        "original": parameters(model),
        "converted": parameters(converted),
    }
    results["converted_step0"] = {"test": accuracy(converted, test)}
    if not args.no_calibrate:
        batches = list(train_data[0].split(batch))[:cal_batches]
        report = calibrate(
            converted, model, batches, steps=cal_steps, lr=args.calibrate_lr
        )
        console.print(f"calibrate: {report.summary()}")
        results["calibrated"] = {
            "test": accuracy(converted, test),
            "seconds": report.seconds,
            "stages": [vars(s) for s in report.stages],
        }

    tuned: dict[str, nn.Module] = {}
    kinds = ["converted"] if args.skip_original else ["original", "converted"]
    for kind in kinds:
        net = copy.deepcopy(model) if kind == "original" else converted
        before = loss_on(net, train_data)
        start = time.perf_counter()
        history = train(
            net, train_data, epochs=epochs, lr=args.lr, batch=batch,
            seed=args.seed + 1, label=f"fine-tune {kind}", test=test,
        )  # fmt: skip
        results[f"{kind}_finetuned"] = {
            "test": accuracy(net, test),
            "loss_before": before,
            "loss_after": loss_on(net, train_data),
            "seconds": time.perf_counter() - start,
            "history": history,
        }
        tuned[kind] = net
    if not args.skip_original:
        x, y = train_data[0][:batch], train_data[1][:batch]
        results["step"] = measure(
            tuned,
            lambda net: F.cross_entropy(net(x), y),
            lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
            rounds=2 if tiny else 6,
            device=dev,
        )
    summary = summary_table(results, epochs, pre_epochs)
    return finish(console, summary, results, args.json)


def summary_table(results: dict[str, Any], epochs: int, pre_epochs: int) -> Table:
    table = Table(title="ResNet-18 on digits", title_justify="left")
    table.add_column("model")
    for col in ("test accuracy", "peak memory", "saved for backward", "step time"):
        table.add_column(col, justify="right")
    step = results.get("step")

    def row(label: str, key: str, cost: str | None = None) -> None:
        if key not in results:
            return
        cells = ["", "", ""]
        if step and cost:
            cells = cost_cells(step[cost], step["original"], cost != "original")
        table.add_row(label, f"{results[key]['test']:.2%}", *cells)

    row(f"original, trained {pre_epochs} epochs", "original")
    row(f"converted ({results['init']}), step 0", "converted_step0")
    row("converted, calibrated", "calibrated")
    row(f"original, fine-tuned {epochs} more epochs", "original_finetuned", "original")
    row(f"converted, fine-tuned {epochs} epochs", "converted_finetuned", "converted")
    return table


if __name__ == "__main__":
    sys.exit(main())
