"""The user's journey after `convert`, one check at a time, on one zoo model.

Each check returns ``"ok"``, ``"n/a: why"`` (the original cannot do it either, or the
check does not apply) or ``"FAIL: why"``. A check that raises is a failure with the
exception named; no check stops the others.
"""

from __future__ import annotations

import copy
import io
import math
import random
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from zoo_models import Entry, Inputs

import revcompile
from revcompile.errors import RevCompileError

CHECKS = ("convert", "grads64", "batch", "batch1", "casts", "autocast", "head",
          "state", "modes", "generate")  # fmt: skip
RTOL = 1e-8  # float64, per parameter (issue 10)
MAX_PARAMS = 150_000_000
FLOOR = 1e-6  # of the largest gradient: some true gradients are 0 and only noise


class Failed(Exception):
    """A check's finding, as opposed to an error raised inside it."""


def output(out: Any) -> Tensor:
    """The tensor a user trains on: logits, else the last hidden state, else the
    first tensor."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):  # transformers' ModelOutput
        for key in ("logits", "last_hidden_state"):
            if isinstance(out.get(key), Tensor):
                return out[key]
        out = list(out.values())
    if isinstance(out, tuple | list):
        for item in out:
            try:
                return output(item)
            except Failed:
                continue
    raise Failed(f"no tensor in the output ({type(out).__name__})")


def cast_inputs(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    args, kwargs = inputs

    def c(t: Tensor) -> Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    return tuple(c(a) for a in args), {k: c(v) for k, v in kwargs.items()}


def run(model: nn.Module, inputs: Inputs, seed: int = 7) -> Tensor:
    torch.manual_seed(seed)  # the same dropout and drop-path draws in both models
    random.seed(seed)
    np.random.seed(seed)  # SpecAugment's masks (wav2vec2 and kin)
    args, kwargs = inputs
    return output(model(*args, **kwargs))


def loss_of(out: Tensor) -> Tensor:
    weight = torch.linspace(-1, 1, out.numel(), dtype=torch.float64)
    return (out.double().flatten() * weight).sum()


def step(
    model: nn.Module, inputs: Inputs, storing: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and parameter gradients of one forward and backward."""
    model.zero_grad(set_to_none=True)
    if storing:
        with revcompile.storing_activations():
            loss = loss_of(run(model, inputs))
    else:
        loss = loss_of(run(model, inputs))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _call(model: nn.Module, inputs: Inputs) -> Any:
    args, kwargs = inputs
    return model(*args, **kwargs)


def _convert(model: nn.Module, inputs: Inputs) -> nn.Module:
    args, kwargs = inputs
    return revcompile.convert(model, kwargs if kwargs else args)


def _snapshot(model: nn.Module) -> tuple:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [(n, type(m), m.training) for n, m in model.named_modules()]


def _same(a: tuple, b: tuple) -> bool:
    return (
        a[1] == b[1]
        and a[0].keys() == b[0].keys()
        and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    )


# -- the checks -------------------------------------------------------------------


def check_grads64(entry: Entry, model: nn.Module, converted: nn.Module) -> str:
    original = copy.deepcopy(model).double()
    why = ""
    for make in (entry.grad_inputs, entry.inputs):
        if make is None:
            continue
        inputs = cast_inputs(make(2, 8), torch.float64)
        try:
            loss_o, grads_o = step(original, inputs)
            break
        except Exception as e:
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
    else:
        return f"n/a: the original does not run in float64 ({why})"
    if not math.isfinite(loss_o.item()):
        return "n/a: the original is not finite in float64"
    c64 = copy.deepcopy(converted).double()
    loss_r, grads_r = step(c64, inputs)
    loss_s, grads_s = step(c64, inputs, storing=True)
    if grads_r.keys() != grads_s.keys():
        raise Failed(
            f"gradient sets differ: {sorted(grads_r.keys() ^ grads_s.keys())[:3]}"
        )
    unused_o = {n for n, _ in original.named_parameters()} - grads_o.keys()
    unused_c = {n for n, _ in c64.named_parameters()} - grads_r.keys()
    if unused_c - unused_o:
        raise Failed(f"no gradient for {sorted(unused_c - unused_o)[:3]}")
    if abs(loss_r - loss_s) > RTOL * abs(loss_s) + 1e-300:
        raise Failed(f"loss {loss_r.item():.6g} vs storing {loss_s.item():.6g}")
    scale = max((g.abs().max().item() for g in grads_s.values()), default=0.0)
    worst, where = 0.0, ""
    for n, s in grads_s.items():
        err = (grads_r[n] - s).abs().max().item()
        tol = RTOL * max(s.abs().max().item(), FLOOR * scale)
        ratio = err / tol if tol > 0 else (math.inf if err > 0 else 0.0)
        if ratio > worst:
            worst, where = ratio, n
    if worst > 1.0:
        raise Failed(f"gradient of {where} {worst:.3g}x the tolerance")
    return "ok"


def _train_step(model: nn.Module, inputs: Inputs) -> Tensor:
    model.train()
    out = run(model, inputs)
    loss_of(out).backward()
    with torch.no_grad():  # a bounded step: random-weight gradients can be huge
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(1e-4 * p.grad.sign())
    return out


def check_batch(entry: Entry, model: nn.Module, converted: nn.Module) -> str:
    done = []
    for batch, length in ((3, 8), (3, 12), (1, 8)):
        inputs = entry.inputs(batch, length)
        if entry.zoo != "hf" and length != 8:
            continue  # images have no length
        try:
            want = _train_step(copy.deepcopy(model), inputs)
        except Exception:
            continue
        got = _train_step(copy.deepcopy(converted), inputs)
        if got.shape != want.shape:
            raise Failed(f"batch {batch}, length {length}: shape {tuple(got.shape)}")
        done.append(f"{batch}x{length}")
    return "ok" if done else "n/a: the original takes no other shape"


def check_batch1(entry: Entry, model: nn.Module, _converted: nn.Module) -> str:
    """Converted on a batch of one, then trained on a batch of two."""
    one = _convert(model, entry.inputs(1, 8))
    inputs = entry.inputs(2, 8)
    with torch.no_grad():
        want = run(copy.deepcopy(model).eval(), inputs)
    got = _train_step(one, inputs)
    if got.shape != want.shape:
        raise Failed(f"shape {tuple(got.shape)}, the original's {tuple(want.shape)}")
    return "ok"


def check_casts(entry: Entry, model: nn.Module, converted: nn.Module) -> str:
    """`.to(dtype)` and a training step: what the original does under the same cast,
    including its float32 islands (the output dtype is the original's)."""
    base = entry.inputs(2, 8)
    skipped = []
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        inputs = cast_inputs(base, dtype)
        try:  # the original's forward is enough to know its dtype and range
            with torch.no_grad():
                want = run(copy.deepcopy(model).to(dtype).train(), inputs)
        except Exception as e:
            skipped.append(f"{dtype} ({type(e).__name__})")
            continue
        got = _train_step(copy.deepcopy(converted).to(dtype), inputs)
        if got.dtype != want.dtype:
            raise Failed(f"{dtype}: output {got.dtype}, the original's {want.dtype}")
        if finite(want) and not finite(got):
            raise Failed(f"{dtype}: not finite where the original is")
    if len(skipped) == 3:
        return "n/a: the original casts to none"
    return "ok"


def check_autocast(entry: Entry, model: nn.Module, converted: nn.Module) -> str:
    inputs = entry.inputs(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            want = _train_step(copy.deepcopy(model), inputs)
        except Exception as e:
            return f"n/a: the original fails under autocast ({type(e).__name__})"
        got = _train_step(copy.deepcopy(converted), inputs)
    if got.dtype != want.dtype:
        raise Failed(f"output {got.dtype}, the original's {want.dtype}")
    if finite(want) and not finite(got):
        raise Failed("not finite where the original is")
    return "ok"


def _head(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The Linear a user replaces: ``fc``, ``head``, or the last of ``classifier``."""
    for name in ("fc", "classifier", "head", "heads"):  # not an LM head: tied weights
        m = getattr(model, name, None)
        if isinstance(m, nn.Linear):
            return model, name
        if isinstance(m, nn.Sequential) and isinstance(m[-1], nn.Linear):
            return m, list(m._modules)[-1]  # named children too (ViT's heads.head)
    return None


def check_head(entry: Entry, _model: nn.Module, converted: nn.Module) -> str:
    """A new head: timm's reset_classifier, or a Linear put where the old one was."""
    c = copy.deepcopy(converted)
    if hasattr(c, "reset_classifier") and entry.zoo == "timm":
        c.reset_classifier(5)
    elif (found := _head(c)) is not None:
        parent, name = found
        setattr(parent, name, nn.Linear(getattr(parent, name).in_features, 5))
    else:
        return "n/a: no head to replace"
    out = _train_step(c, entry.inputs(3, 8))
    if out.shape[-1] != 5:
        raise Failed(f"output {tuple(out.shape)} after a 5-way head")
    return "ok"


def check_state(entry: Entry, model: nn.Module, converted: nn.Module) -> str:
    """state_dict into a fresh convert, torch.save/load and deepcopy: the same eval
    output as the trained converted model."""
    inputs = entry.inputs(2, 8)
    trained = copy.deepcopy(converted)
    _train_step(trained, inputs)  # its weights now differ from any fresh convert
    trained.eval()
    with torch.no_grad():
        want = run(trained, inputs)
        fresh = _convert(model, inputs)
        fresh.load_state_dict(trained.state_dict(), strict=True)
        others = [("state_dict", fresh), ("deepcopy", copy.deepcopy(trained))]
        try:
            torch.save(model, io.BytesIO())
        except Exception:
            pass
        else:
            buf = io.BytesIO()
            torch.save(trained, buf)
            buf.seek(0)
            others.append(("torch.load", torch.load(buf, weights_only=False)))
        for how, other in others:
            got = run(other.eval(), inputs)
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True):
                err = (got - want).abs().max().item()
                raise Failed(f"{how}: eval output {err:.2g} away")
    return "ok"


def _differ(a: Tensor, b: Tensor) -> bool:
    """Beyond rounding: eval-only fast paths (fused attention) round differently."""
    scale = max(a.abs().max().item(), 1e-12)
    return a.shape != b.shape or (a - b).abs().max().item() > 1e-4 * scale


def check_modes(entry: Entry, model: nn.Module, converted: nn.Module) -> str:
    """eval() and train() reach every submodule; eval is deterministic; train mode
    differs from eval exactly where the original's does (dropout, batch norm)."""
    inputs = entry.inputs(2, 8)
    c = copy.deepcopy(converted)
    o = copy.deepcopy(model)
    with torch.no_grad():
        outs = {}
        for name, m in (("original", o), ("converted", c)):
            m.eval()
            if any(x.training for x in m.modules()):
                raise Failed(f"{name}: a submodule stays in training mode")
            e1, e2 = run(m, inputs, 1), run(m, inputs, 2)
            m.train()
            t = run(m, inputs, 1)
            outs[name] = (e1, e2, t)
    e1, e2, t = outs["converted"]
    if not torch.equal(e1, e2):
        raise Failed("eval is not deterministic")
    oe, _, ot = outs["original"]
    if _differ(oe, ot) != _differ(e1, t):
        said = "differs" if _differ(oe, ot) else "does not differ"
        raise Failed(
            f"the original's train output {said} from eval; the converted's not"
        )
    return "ok"


def check_generate(entry: Entry, _model: nn.Module, converted: nn.Module) -> str:
    """Greedy generate equals greedy decoding with the converted model's forward."""
    if not entry.causal_lm or not hasattr(converted, "generate"):
        return "n/a: not a causal language model"
    c = copy.deepcopy(converted).eval()
    ids = entry.inputs(1, 6)[1]["input_ids"]
    with torch.no_grad():
        out = c.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                         do_sample=False)  # fmt: skip
        seq = ids
        for _ in range(3):
            logits = output(c(input_ids=seq, attention_mask=torch.ones_like(seq)))
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    if not torch.equal(out[:, : seq.shape[1]], seq):
        raise Failed(f"generate {out.tolist()} vs forward {seq.tolist()}")
    return "ok"


CHECK_FNS: dict[str, Callable[[Entry, nn.Module, nn.Module], str]] = {
    "grads64": check_grads64,
    "batch": check_batch,
    "batch1": check_batch1,
    "casts": check_casts,
    "autocast": check_autocast,
    "head": check_head,
    "state": check_state,
    "modes": check_modes,
    "generate": check_generate,
}


def _reason(e: BaseException) -> str:
    if isinstance(e, Failed):
        return f"FAIL: {e}"
    frame = traceback.extract_tb(e.__traceback__)[-1]
    where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    first = " ".join(str(e).split())[:400]
    return f"FAIL: {type(e).__name__} at {where}: {first}"


def journey(entry: Entry, checks: tuple[str, ...] = CHECKS) -> dict[str, Any]:
    """Every check on one model; the row of the sweep's table."""
    row: dict[str, Any] = {"model": entry.name}
    try:
        model = entry.build()
        inputs = entry.inputs(2, 8)
        with torch.no_grad():
            _call(copy.deepcopy(model).eval(), inputs)
    except Exception as e:
        row["build"] = _reason(e).replace("FAIL: ", "", 1)
        return row
    row["params"] = sum(p.numel() for p in model.parameters())
    if row["params"] > MAX_PARAMS:
        row["build"] = (
            f"{row['params'] / 1e6:.0f}M parameters, over the sweep's cap "
            f"of {MAX_PARAMS / 1e6:.0f}M (24 GiB RAM, float64 copies)"
        )
        return row
    before = _snapshot(model)
    start = time.perf_counter()
    try:
        converted = _convert(model, inputs)
    except RevCompileError as e:
        row["convert"] = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return row
    except Exception as e:
        row["convert"] = _reason(e).replace("FAIL: ", "FAIL: bare ", 1)
        return row
    plan = converted.revcompile_plan
    row["blocks"] = f"{sum(len(s.blocks) for s in plan.stages)}/{len(plan.blocks)}"
    if not _same(before, _snapshot(model)):
        row["convert"] = "FAIL: the user's model was modified"
    elif type(converted) is not type(model):
        row["convert"] = f"FAIL: class {type(converted).__name__}"
    else:
        row["convert"] = "ok"
    row["convert_s"] = round(time.perf_counter() - start, 1)
    times = {}
    for name in checks:
        if name == "convert":
            continue
        start = time.perf_counter()
        try:
            row[name] = CHECK_FNS[name](entry, model, converted)
        except Exception as e:
            row[name] = _reason(e)
        times[name] = round(time.perf_counter() - start, 1)
    row["check_s"] = times
    return row
