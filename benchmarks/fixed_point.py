"""Which residual blocks ``coupling="fixed_point"`` converts, and how fast they invert.

    python benchmarks/fixed_point.py [--quick] [--markdown] [--json PATH]
        [--models torchvision:resnet18,hf:llama] [--minutes 3]

1. The zoo's CI subset (benchmarks/zoo_models.py), random weights: per model the
   residual blocks, how many the additive coupling and fixed_point convert, the
   probe's evaluations of f for the converted ones (median / max) and the commonest
   reason for the rest (Note [Convert only what converges] in passes/probe.py).
2. tests/models.py's NanoGPT (pre-norm) trained here on the bytes of some standard
   library sources: the same figures at step 0 and after each third of training;
   at the end the fixed_point conversion's eval output and one float32 training
   step's parameter gradients against the original's.

The Plan keeps iteration counts only as a min-max note per stage, so the benchmark
records every probe itself (`recorded_probes`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tables import table
from torch import Tensor, nn
from torch.nn import functional as F

import revcompile
from revcompile.errors import ReconstructionError
from revcompile.passes import probe as probe_pass
from revcompile.passes import scopes
from revcompile.passes.ir import Plan, ReasonKind, ResidualBlock
from revcompile.runtime.couplings.fixed_point import FixedPointProbe
from revcompile.runtime.stage import ReversibleStage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.models, when run as benchmarks/fixed_point.py
from tests.models import NanoGPT  # noqa: E402

QUICK = ("torchvision:resnet18", "timm:test_vit", "hf:gpt2")
SOURCES = ("argparse", "inspect", "typing", "dataclasses", "functools", "textwrap",
           "json.decoder", "json.encoder", "pathlib", "enum", "difflib", "shlex",
           "tokenize", "string", "ast", "collections")  # fmt: skip
LAYERS = 4  # the decoder's
Probes = dict[tuple[str, str], FixedPointProbe]  # (scope, join) -> its probe


@contextlib.contextmanager
def recorded_probes() -> Iterator[Probes]:
    """Every probe the planner runs, by (scope, join); a block probed in several
    traces (the model, then its enclosing submodule) keeps the last one."""
    probes: Probes = {}
    seen: list[FixedPointProbe] = []
    inner, blocks_of = probe_pass.probe_fixed_point, scopes.probe_blocks

    def probe(*args: Any, **kwargs: Any) -> FixedPointProbe:
        seen.append(result := inner(*args, **kwargs))
        return result

    def probe_blocks(traced: Any, plan: Plan, options: Any) -> Any:
        seen.clear()
        out = blocks_of(traced, plan, options)
        joins = [j for stage in plan.stages for j in stage.blocks]  # its probe order
        probes.update({(traced.path, j): p for j, p in zip(joins, seen, strict=True)})
        return out

    probe_pass.probe_fixed_point, scopes.probe_blocks = probe, probe_blocks
    try:
        yield probes
    finally:
        probe_pass.probe_fixed_point, scopes.probe_blocks = inner, blocks_of


def analyze_fixed_point(model: nn.Module, example: Any) -> tuple[Plan, Probes]:
    with recorded_probes() as probes:
        plan = revcompile.analyze(model, example, coupling="fixed_point")
    return plan, probes


def _iterations(blocks: list[ResidualBlock], probes: Probes) -> str:
    its = [probes[b.scope, b.join].iterations for b in blocks if b.stage is not None]
    return f"{statistics.median(its):g} / {max(its)}" if its else "-"


def _rates(blocks: list[ResidualBlock], probes: Probes) -> str:
    """Contraction rates of the blocks whose inverse does not converge."""
    rates = [
        probes[b.scope, b.join].contraction
        for b in blocks
        if b.reason is not None and b.reason.kind is ReasonKind.NOT_CONTRACTIVE
    ]
    if not rates:
        return "-"
    low, high = min(rates), max(rates)
    return f"{low:.2f}" if low == high else f"{low:.2f}-{high:.2f}"


def _why_not(blocks: list[ResidualBlock], probes: Probes) -> str:
    """The commonest reason among the blocks that stay, with its count."""
    kinds = Counter(b.reason.kind for b in blocks if b.reason is not None)
    if not kinds:
        return "-"
    kind, n = kinds.most_common(1)[0]
    if kind is ReasonKind.NOT_CONTRACTIVE:
        return f"{n}x does not converge, rate {_rates(blocks, probes)}"
    return f"{n}x {kind.value}"


def zoo_row(name: str) -> dict[str, Any]:
    from zoo_models import entry_named

    start = time.perf_counter()
    row: dict[str, Any] = {"model": name}
    try:
        entry = entry_named(name)
        model = entry.build()
        args, kwargs = entry.inputs(2, 8)
        example = kwargs if kwargs else args
        additive = revcompile.analyze(model, example)
        plan, probes = analyze_fixed_point(model, example)
        blocks = list(plan.blocks)
        row |= {
            "blocks": len(blocks),
            "additive": len(additive.converted),
            "fixed_point": len(plan.converted),
            "iterations": _iterations(blocks, probes),
            "others": _why_not(blocks, probes),
        }
    except Exception as e:  # one model's failure is its row
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def zoo_table(rows: list[dict[str, Any]], md: bool) -> None:
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["model"], "error", "", "", "", "", r["error"]])
            continue
        share = r["fixed_point"] / r["blocks"] if r["blocks"] else 0.0
        cells.append([
            r["model"], str(r["blocks"]), str(r["additive"]), str(r["fixed_point"]),
            f"{share:.0%}", r["iterations"], r["others"],
        ])  # fmt: skip
    header = ["model", "residual blocks", "additive converts", "fixed_point converts"]
    header += ["share", "evaluations of f (median / max)", "commonest reason to stay"]
    title = "Zoo (random weights): blocks whose fixed-point inverse converges"
    table(title, cells, header, md)


def corpus() -> Tensor:
    """Real text without a download: bytes of some standard-library sources."""
    text = "".join(inspect.getsource(importlib.import_module(m)) for m in SOURCES)
    return torch.tensor(list(text.encode()), dtype=torch.long)


def batch(data: Tensor, size: int, length: int, g: torch.Generator) -> Tensor:
    start = torch.randint(0, len(data) - length - 1, (size,), generator=g)
    return torch.stack([data[s : s + length + 1] for s in start.tolist()])  # (B, T+1)


def lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    logits = model(tokens[:, :-1])  # (B, T, 256)
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def decoder_row(
    model: nn.Module, step: int, loss: float, val: Tensor, example: Tensor
) -> dict[str, Any]:
    model.eval()
    with torch.no_grad():
        held_out = lm_loss(model, val).item()
    model.train()
    plan, probes = analyze_fixed_point(model, (example,))
    blocks = list(plan.blocks)
    # NanoGPT's blocks come in pairs: x + attn(ln_1(x)), then x + mlp(ln_2(x)).
    attn = [b for b in blocks if any("attn" in n for n in b.branch)]
    mlp = [b for b in blocks if b not in attn]
    return {
        "step": step, "train_loss": round(loss, 3), "held_out_loss": round(held_out, 3),
        "converted": len(plan.converted), "blocks": len(blocks),
        "attention": f"{sum(b.stage is not None for b in attn)}/{len(attn)}",
        "mlp": f"{sum(b.stage is not None for b in mlp)}/{len(mlp)}",
        "iterations": _iterations(blocks, probes), "rates": _rates(blocks, probes),
    }  # fmt: skip


def gpt_init(model: NanoGPT) -> NanoGPT:
    """nanoGPT's own init (tests/models.py keeps torch's defaults: N(0, 1) tied
    embeddings start the loss near 50, not ln 256)."""
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, std=0.02 / (2 * LAYERS) ** 0.5)
    return model


def _renamed(original: str, converted: str) -> bool:
    """A rewrite inserts segments inside the scope it replaces: ``h.1.ln_1.weight``
    becomes ``h.1.rev_h_1.couplings.0.f.ln_1.weight`` (or ``rev_h_0...f.h.1...``)."""
    parts, got = original.split("."), converted.split(".")
    return any(
        got[:i] == parts[:i] and got[len(got) - len(parts) + i :] == parts[i:]
        for i in range(len(parts) + 1)
        if len(got) >= len(parts)
    )


def grad_check(
    model: nn.Module, example: Tensor, tokens: Tensor, guard: bool
) -> dict[str, Any]:
    """The converted model's eval output and float32 training gradients against the
    original's, matched by name (a stage's parameters keep theirs as a suffix).
    With the guard, a drifted rebuild re-anchors on the saved input and the
    gradients are storing mode's; without it they are the solver's own."""
    converted = revcompile.convert(
        model, (example[:, :-1],), coupling="fixed_point", guard=guard
    )
    model.eval(), converted.eval()
    with torch.no_grad():
        out = (converted(tokens[:, :-1]) - model(tokens[:, :-1])).abs().max().item()
    model.train(), converted.train()
    found: dict[str, Any] = {"guard": guard, "eval_max_abs_diff": out}
    found["stages"] = len(converted.revcompile_plan.stages)
    grads = []
    for m in (model, converted):
        m.zero_grad(set_to_none=True)
        try:
            lm_loss(m, tokens).backward()
        except ReconstructionError as e:  # unguarded, a solve that fails raises
            return found | {"raised": str(e).split(": ", 1)[1].split(";")[0]}
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    errors, unmatched = {}, []
    for name, g in grads[1].items():
        refs = [n for n in grads[0] if _renamed(n, name)]
        if len(refs) != 1:
            unmatched.append(name)
            continue
        ref = refs[0]
        scale = grads[0][ref].abs().max()
        errors[name] = ((g - grads[0][ref]).abs().max() / scale).item()
    worst = max(errors, key=errors.__getitem__)
    logs = [
        m.reconstruction_log
        for m in converted.modules()
        if isinstance(m, ReversibleStage)
    ]
    return found | {
        "grad_max_rel_err": errors[worst], "worst": worst,
        "compared": f"{len(errors)} of {len(grads[0])}", "unmatched": unmatched,
        "anchored": sum(log.anchored for log in logs),
        "not_converged": sum(log.not_converged for log in logs),
        "failures": [f for log in logs for f in log.failures],
    }  # fmt: skip


def decoder(seconds: float, md: bool, steps: int | None = None) -> dict[str, Any]:
    """Train for `seconds`, or for `steps` (--quick: the same model every run)."""
    torch.manual_seed(0)
    data = corpus()
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    g = torch.Generator().manual_seed(0)
    length, size = 64, 16
    model = gpt_init(NanoGPT(LAYERS, 96, 4, 256, block_size=length, dropout=0.0))
    # nanoGPT's shakespeare_char settings: byte-level text of about this size.
    opt = torch.optim.AdamW(model.parameters(), 1e-3, (0.9, 0.99), weight_decay=0.1)
    val, example = batch(held, 32, length, g), batch(held, 4, length, g)
    first = lm_loss(model, batch(train, size, length, g)).item()
    rows = [decoder_row(model, 0, first, val, example[:, :-1])]
    step, recent, trained = 0, [first], 0.0
    for third in (1, 2, 3):
        start = time.perf_counter()
        while (
            step < steps * third // 3
            if steps
            else trained + time.perf_counter() - start < seconds * third / 3
        ):
            loss = lm_loss(model, batch(train, size, length, g))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, recent = step + 1, [*recent[-49:], loss.item()]
        trained += time.perf_counter() - start
        loss_now = statistics.mean(recent)
        rows.append(decoder_row(model, step, loss_now, val, example[:, :-1]))
    cells = [[str(r["step"]), f"{r['train_loss']:.3f}", f"{r['held_out_loss']:.3f}",
              f"{r['converted']} / {r['blocks']}", r["attention"], r["mlp"],
              r["iterations"], r["rates"]] for r in rows]  # fmt: skip
    header = ["step", "train loss (last 50)", "held-out loss", "converted"]
    header += ["attention", "MLP", "evaluations of f (median / max)", "rates that fail"]
    title = f"NanoGPT ({LAYERS} x d96, pre-norm) on {len(data) / 1e6:.2f} MB of stdlib"
    budget = f"{steps} steps" if steps else f"{seconds:.0f} s"
    title += f" source, {budget} of AdamW on 1 thread"
    table(title, cells, header, md)
    tokens = batch(train, size, length, g)
    checks = [grad_check(model, example, tokens, guard) for guard in (True, False)]
    for c in checks:
        print(
            f"\nconverted at step {step}, guard={c['guard']}: {c['stages']} stage(s); "
            f"eval output max |diff| {c['eval_max_abs_diff']:.3g}; one float32 "
            "training step: ",
            end="",
        )
        if "raised" in c:
            print(f"backward raised ReconstructionError: {c['raised']}")
            continue
        # A measurement, not a broken benchmark: no FAILED for the smoke test.
        verdict = "ok" if c["grad_max_rel_err"] <= 1e-4 else "above target"
        print(
            f"{c['compared']} parameter gradients: max rel. error "
            f"{c['grad_max_rel_err']:.3g} ({c['worst']}); {c['anchored']} "
            f"re-anchored, {c['not_converged']} solves not converged "
            f"{c['failures'][:1]}; {len(c['unmatched'])} names unmatched "
            f"(target 1e-4): {verdict}"
        )
    return {"rows": rows, "checks": checks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 models, 90 training steps")
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    p.add_argument("--models", help="comma-separated zoo names (default CI_SUBSET)")
    p.add_argument("--minutes", type=float, default=3.0, help="decoder training time")
    p.add_argument("--json", type=Path, help="write the figures here")
    a = p.parse_args()
    torch.set_num_threads(1)  # the machine is shared; figures are counts, not times
    warnings.filterwarnings("ignore")  # the zoo's own deprecation chatter
    from zoo_models import CI_SUBSET

    names = a.models.split(",") if a.models else QUICK if a.quick else CI_SUBSET
    start = time.perf_counter()
    rows = [zoo_row(n) for n in names]
    zoo_table(rows, a.markdown)
    trained = decoder(60 * a.minutes, a.markdown, steps=90 if a.quick else None)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"zoo": rows, "decoder": trained}, indent=1))


if __name__ == "__main__":
    main()
