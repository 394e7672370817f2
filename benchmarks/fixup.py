"""Does ``init="fixup"`` keep every fixed-point block converged through training?

    python benchmarks/fixup.py [--quick] [--markdown] [--json PATH] [--png PATH]
        [--epochs 4] [--every 10] [--threads 1]

examples/finetune_digits.py's pre-activation ResNet, trained from scratch on
scikit-learn's digits (32 x 32) with the example's pretraining budget (SGD, Nesterov
momentum 0.9, lr 0.05, weight decay 5e-4, cosine schedule, batch 64, 4 epochs), twice
on the same batches, one step of each per batch: converted with
``coupling="fixed_point", init="fixup"``, and unconverted with the converted model's
weights (fixup's zeroed last layers included: the same function at step 0).

Per step: for every converted block, whether its backward's fixed-point solve
converged and its evaluations of f (each coupling's `_solve` is wrapped here: the
runtime keeps no per-block record); for every stage, the drift guard's error against
its tolerance and whether it re-anchored (`stage.reconstruction_log`). After each
table row: `probe_fixed_point` on every block at a fixed batch (untimed), for its
contraction rate. --quick: 8 x 8 images, 8 steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fixup_report import plot, report
from torch import Tensor, nn
from torch.nn import functional as F

import revcompile
from revcompile.runtime.couplings import probe_fixed_point
from revcompile.runtime.couplings.base import Unrebuildable
from revcompile.runtime.couplings.fixed_point import FixedPointCoupling
from revcompile.runtime.stage import ReversibleStage

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))  # the example, not edited
from finetune_digits import accuracy, load_data, make_model  # noqa: E402

LR, BATCH, EPOCHS = 0.05, 64, 4  # finetune_digits.py's pretraining


@dataclass
class Block:
    """A converted block: its original path, its stage, its solves this step."""

    name: str
    stage: str
    coupling: FixedPointCoupling
    solves: list[tuple[bool, int]] = field(default_factory=list)  # (converged, its)

    def watch(self) -> None:
        c, inner = self.coupling, self.coupling._solve

        def solve(*args: Any) -> Tensor:
            try:
                x = inner(*args)
            except Unrebuildable:
                self.solves.append((False, c.last_iterations))
                raise
            self.solves.append((True, c.last_iterations))
            return x

        c._solve = solve  # type: ignore[method-assign]


def stages_of(model: nn.Module) -> dict[str, ReversibleStage]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ReversibleStage)}


def blocks_of(model: nn.Module) -> list[Block]:
    """Named by the stage's parent and the branch's own module path (``blocks`` +
    ``3`` from ``3.conv1.weight``)."""
    found = []
    for stage, s in stages_of(model).items():
        parent = stage.rsplit(".", 1)[0]
        for c in s.couplings:
            owner = next(iter(c.f.named_parameters()))[0].split(".")[0]
            found.append(Block(f"{parent}.{owner}", stage, c))  # type: ignore[arg-type]
    return found


def renamed(original: str, converted: str) -> bool:
    """A rewrite inserts segments inside the path it replaces: ``blocks.3.conv1.w``
    becomes ``blocks.rev_blocks_3.couplings.0.f.3.conv1.w``."""
    parts, got = original.split("."), converted.split(".")
    return len(got) >= len(parts) and any(
        got[:i] == parts[:i] and got[len(got) - len(parts) + i :] == parts[i:]
        for i in range(len(parts) + 1)
    )


def reference(model: nn.Module, converted: nn.Module) -> nn.Module:
    """The unconverted model with the converted one's weights: fixup's zeros."""
    ref = copy.deepcopy(model)
    got = dict(converted.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            match = [n for n in got if renamed(name, n)]
            assert len(match) == 1, (name, match)
            p.copy_(got[match[0]])
    return ref


def sgd(model: nn.Module, steps: int) -> tuple[Any, Any]:
    """finetune_digits.train's optimizer and schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))


def timed_step(model: nn.Module, opt: Any, sched: Any, x: Tensor, y: Tensor) -> Any:
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item(), time.perf_counter() - start


def probe(ref: nn.Module, blocks: list[Block], x: Tensor) -> dict[str, list[Any]]:
    """Per block [converged, evaluations, contraction] on its real input at batch x
    (the unconverted model's, train mode), running statistics left as they were."""
    inputs: dict[str, Tensor] = {}
    hooks = [
        ref.get_submodule(b.name).register_forward_pre_hook(
            lambda _, args, n=b.name: inputs.__setitem__(n, args[0])
        )
        for b in blocks
    ]
    saved = copy.deepcopy(ref.state_dict())
    with torch.no_grad():
        ref.train()(x)
    ref.load_state_dict(saved)
    for h in hooks:
        h.remove()
    found = {}
    for b in blocks:
        p = probe_fixed_point(b.coupling.f, inputs[b.name])
        found[b.name] = [p.converged, p.iterations, p.contraction]
    return found


def grad_check(model: nn.Module, converted: nn.Module, x: Tensor, y: Tensor) -> float:
    """Max relative parameter-gradient error of the converted model against the
    unconverted one at the converted weights (so not the reference's own, drifted
    trajectory): the loss on (x, y), running statistics and guard logs restored."""
    ref, state = reference(model, converted), copy.deepcopy(converted.state_dict())
    stages = stages_of(converted).values()
    logs = [copy.deepcopy(s.reconstruction_log) for s in stages]
    grads = []
    for net in (ref.train(), converted):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        grads.append(dict(net.named_parameters()))
    converted.load_state_dict(state)
    for s, log in zip(stages, logs, strict=True):
        s.reconstruction_log = log
    errs = []
    for name, p in grads[0].items():
        (got,) = [q for n, q in grads[1].items() if renamed(name, n)]
        assert p.grad is not None and got.grad is not None, name
        errs.append(((got.grad - p.grad).abs().max() / p.grad.abs().max()).item())
    converted.zero_grad(set_to_none=True)
    return max(errs)


def train(args: argparse.Namespace) -> dict[str, Any]:
    size, tiny, batch = (8, True, 16) if args.quick else (32, False, BATCH)
    epochs = 2 if args.quick else args.epochs
    every = args.every or (2 if args.quick else 10)
    torch.manual_seed(0)  # the example's seed: the same model and split
    (x, y), test = load_data(size, tiny, torch.device("cpu"))
    model = make_model("preact")
    example = (x[:2],)
    eligible = len(revcompile.analyze(model, example).converted)
    converted = revcompile.convert(model, example, coupling="fixed_point", init="fixup")
    ref = reference(model, converted)
    blocks, stages = blocks_of(converted), stages_of(converted)
    for b in blocks:
        b.watch()
    nets = {"unconverted": ref, "converted": converted}
    with torch.no_grad():
        diff0 = (ref.eval()(test[0]) - converted.eval()(test[0])).abs().max().item()
    converted.train()  # the probes below see train-mode batch statistics
    steps = epochs * math.ceil(len(y) / batch)
    opts = {kind: sgd(net, steps) for kind, net in nets.items()}
    order = torch.Generator().manual_seed(0)  # finetune_digits.train's
    records: list[dict[str, Any]] = []
    check = (x[:batch], y[:batch])  # a fixed batch for the probes and gradients
    probes = {0: probe(ref, blocks, check[0])}
    grads = {0: grad_check(model, converted, *check)}
    tests: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=order).split(batch):
            for b in blocks:
                b.solves.clear()
            seen = {n: s.reconstruction_log.backwards for n, s in stages.items()}
            rec: dict[str, Any] = {"step": len(records) + 1, "loss": {}, "seconds": {}}
            for kind, net in nets.items():
                loss, secs = timed_step(net.train(), *opts[kind], x[idx], y[idx])
                rec["loss"][kind], rec["seconds"][kind] = loss, secs
            # [None, 0]: not solved (a later block of its stage failed first).
            rec["blocks"] = {b.name: list(b.solves[-1] if b.solves else (None, 0))
                             for b in blocks}  # fmt: skip
            rec["stages"] = {
                n: [s.last.max_abs_error, s.last.tolerance, s.last.anchored,
                    s.last.reason]
                for n, s in ((n, st.reconstruction_log) for n, st in stages.items())
                if s.backwards > seen[n] and s.last is not None
            }  # fmt: skip
            records.append(rec)
            if rec["step"] % every == 0 or rec["step"] == steps:
                probes[rec["step"]] = probe(ref, blocks, check[0])
                grads[rec["step"]] = grad_check(model, converted, *check)
        for kind, net in nets.items():
            tests[kind].append(accuracy(net, test))
    with torch.no_grad():
        diff = (ref.eval()(test[0]) - converted.eval()(test[0])).abs().max().item()
    return {
        "size": size, "batch": batch, "lr": LR, "epochs": epochs, "steps": steps,
        "every": every, "threads": torch.get_num_threads(), "eligible": eligible,
        "converted_blocks": len(converted.revcompile_plan.converted),
        "blocks": [b.name for b in blocks],
        "stage_of": {b.name: b.stage for b in blocks},
        "step0_max_abs_logit_diff": diff0, "end_max_abs_logit_diff": diff,
        "test": tests, "records": records, "probes": probes,
        "grad_errors": grads,
        "logs": {n: str(s.reconstruction_log) for n, s in stages.items()},
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 x 8 images, 8 steps")
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--png", type=Path, help="default fixup.png here; none if --quick")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--every", type=int, default=None, help="steps per table row")
    p.add_argument("--threads", type=int, default=1, help="the machine is shared")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")  # re-anchoring warns; the tables count it
    start = time.perf_counter()
    r = train(a)
    r["summary"] = report(r, a.markdown)
    png = a.png or (None if a.quick else HERE / "fixup.png")
    if png is not None and plot(r, png):
        print(f"convergence plot: {png}")
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if a.json:
        a.json.write_text(json.dumps(r, indent=1, default=str))


if __name__ == "__main__":
    main()
