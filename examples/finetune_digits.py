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
    python examples/finetune_digits.py --arch preact --coupling fixed_point

``--coupling`` picks the reversible family (a key of `revcompile.FAMILIES`); where
`calibrate` does not apply to it, the script says why and skips it. ``--arch preact``
is a narrower pre-activation ResNet-18 (BN-ReLU-conv, nothing after the join), whose
blocks are ``x + f(x)`` exactly, so that fixed_point can convert them losslessly.
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
    Storing,
    calibrates,
    cost_cells,
    finish,
    measure,
    plan_record,
    plan_summary,
    progress,
)
from hidden import halve_all, parameters, reinit
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import revcompile
from revcompile.calibrate import calibrate
from revcompile.passes.hidden import HIDDEN

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


def make_model(arch: str) -> nn.Module:
    """resnet18 for 1x32x32 inputs: a 3x3 stride-1 stem instead of 7x7 stride 2, so
    the first residual stage works at 16x16 (after the max-pool) rather than 8x8;
    or the pre-activation variant."""
    if arch == "preact":
        return PreActResNet()
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
    return model


class PreActBlock(nn.Module):
    """He et al. 2016's pre-activation block: ``x + conv(relu(bn(conv(relu(bn(x))))))``,
    nothing after the join; a strided or widening block projects relu(bn(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        return skip + self.conv2(F.relu(self.bn2(self.conv1(out))))


class PreActResNet(nn.Module):
    """ResNet-18's layout (4 stages of 2 blocks) at half its width, same stem."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.MaxPool2d(3, 2, 1)
        )
        blocks, c = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**i
            blocks += [PreActBlock(c, out, stride), PreActBlock(out, out, 1)]
            c = out
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm2d(c)  # the pre-activation of the head
        self.fc = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, H, W) -> (B, classes)
        h = F.relu(self.norm(self.blocks(self.stem(x))))
        return self.fc(h.mean((2, 3)))


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
    families = tuple(revcompile.FAMILIES)
    p.add_argument("--coupling", choices=families, default="additive")
    p.add_argument("--arch", choices=("resnet18", "preact"), default="resnet18")
    p.add_argument(
        "--hidden", default="auto", help="convert's hidden=: auto, full, partition, r"
    )
    p.add_argument("--checkpoint", help="load the pretrained model here, or save it")
    p.add_argument(
        "--skip-original", action="store_true", help="fine-tune the converted only"
    )
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

    model = make_model(args.arch).to(dev)
    example = (train_data[0][:2],)
    # What will convert, before spending time on training; fixed_point's plan depends
    # on the weights (which blocks converge), so this is only the default's.
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
    results |= {"coupling": args.coupling, "arch": args.arch, "hidden": args.hidden}
    results["original"] = {"test": accuracy(model, test)}

    hidden = args.hidden if args.hidden in HIDDEN else float(args.hidden)
    converted = revcompile.convert(
        model, example, coupling=args.coupling, hidden=hidden
    )
    plan = converted.revcompile_plan
    console.print(f"{args.coupling}: {plan.summary()}")
    results["plan"] = plan_record(plan)
    if args.init == "half-hidden":  # the alternative default (examples/hidden.py)
        halve_all(converted)
    else:
        reinit(converted, args.init)
    results["parameters"] = {
        "original": parameters(model),
        "converted": parameters(converted),
    }
    results["converted_step0"] = {"test": accuracy(converted, test)}
    asked = not args.no_calibrate  # calibrate's own re-plan, to compare stages with
    default = revcompile.analyze(model, example) if asked else plan
    if calibrates(asked, args.coupling, plan, default, console, results):
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
    # The step costs the same before fine-tuning: measure the original either way.
    nets = {"original": tuned.get("original", model), "converted": converted}
    nets["storing"] = Storing(converted)
    x, y = train_data[0][:batch], train_data[1][:batch]
    results["step"] = measure(
        nets,
        lambda net: F.cross_entropy(net(x), y),
        lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
        rounds=2 if tiny else 6,
        device=dev,
    )
    summary = summary_table(results, epochs, pre_epochs)
    return finish(console, summary, results, args.json)


def summary_table(results: dict[str, Any], epochs: int, pre_epochs: int) -> Table:
    name = "ResNet-18" if results["arch"] == "resnet18" else "Pre-activation ResNet-18"
    title = f"{name} on digits, {results['coupling']} coupling"
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    for col in ("test accuracy", "peak memory", "saved for backward", "step time"):
        table.add_column(col, justify="right")
    step = results["step"]

    def row(label: str, key: str, cost: str | None = None) -> None:
        if key not in results and cost is None:
            return
        cells = ["", "", ""]
        if cost:
            cells = cost_cells(step[cost], step["original"], cost != "original")
        acc = f"{results[key]['test']:.2%}" if key in results else ""
        table.add_row(label, acc, *cells)

    tuned = "original_finetuned" in results
    first = None if tuned else "original"  # costs on a row that exists
    row(f"original, trained {pre_epochs} epochs", "original", first)
    row(f"converted ({results['init']}), step 0", "converted_step0")
    row("converted, calibrated", "calibrated")
    row(f"original, fine-tuned {epochs} more epochs", "original_finetuned", "original")
    row(f"converted, fine-tuned {epochs} epochs", "converted_finetuned", "converted")
    row("converted, storing mode", "", "storing")
    return table


if __name__ == "__main__":
    sys.exit(main())
