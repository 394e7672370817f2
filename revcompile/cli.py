"""``revcompile report SPEC``: which residual blocks of a model convert, and why not.

Exit codes: 0 success, 2 bad spec or usage, 1 analysis error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

SPEC_FORMS = """accepted SPEC forms:
  torchvision:NAME           a torchvision.models builder, e.g. torchvision:resnet50
  timm:NAME                  a timm model (when timm is installed)
  package.module:attr        a model, or a callable returning one
  path/to/file.py:attr       the same, from a Python file"""


class SpecError(Exception):
    """The SPEC does not name a model."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="revcompile",
        description="Compile residual PyTorch models into reversible networks.",
        epilog=SPEC_FORMS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="which residual blocks of a model convert, and why the others do not",
        epilog=SPEC_FORMS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("spec", metavar="SPEC", help="the model (forms below)")
    report.add_argument(
        "--input-shape",
        metavar="2,3,224,224",
        help="shape of one random float input (default: inferred from the first layer)",
    )
    report.add_argument("--json", action="store_true", help="print the plan as JSON")
    report.add_argument(
        "--min-blocks", type=int, default=1, metavar="N", help="fewest blocks per stage"
    )
    report.add_argument(
        "--budget",
        type=_budget,
        default=None,
        metavar="B",
        help="activation memory allowed: a fraction (0.25) of the original's, or "
        "bytes (3000000000); the planner picks reversible/checkpoint/store per block",
    )
    report.add_argument(
        "--coupling",
        default="additive",
        help="the reversible family (default: additive)",
    )
    args = parser.parse_args(argv)  # exits with 2 on bad usage
    return _report(
        args.spec, args.input_shape, args.json, args.min_blocks, args.budget,
        args.coupling,
    )  # fmt: skip


def _budget(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"--budget {text!r}: a fraction such as 0.25, or bytes such as 3000000000"
        ) from e


def _report(
    spec: str,
    input_shape: str | None,
    as_json: bool,
    min_blocks: int,
    budget: float | int | None = None,
    coupling: str = "additive",
) -> int:
    err = Console(stderr=True)
    try:
        model = load_model(spec)
        inputs = _random_input(input_shape)
    except SpecError as e:
        err.print(f"revcompile: {e}\n{SPEC_FORMS}", markup=False, highlight=False)
        return 2
    # Imported here so that `revcompile --help` and bad specs answer at once.
    from revcompile.errors import RevCompileError
    from revcompile.passes.options import Options
    from revcompile.passes.pipeline import analyze_model
    from revcompile.report import render

    try:
        # What revcompile.analyze does, minus the deep copy: the model is ours.
        options = Options.make(
            min_blocks=min_blocks, memory_budget=budget, coupling=coupling
        )
        if as_json:
            plan = analyze_model(model, inputs, options, copy_model=False).plan
        else:
            with err.status(f"tracing {spec} ..."):
                plan = analyze_model(model, inputs, options, copy_model=False).plan
    except RevCompileError as e:
        err.print(f"revcompile: error: {e}", markup=False, highlight=False)
        return 1
    if as_json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        Console().print(render(plan))
    return 0


def load_model(spec: str) -> Any:
    """The ``nn.Module`` a SPEC names (calling it first when it is a factory)."""
    from torch import nn

    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise SpecError(f"cannot read SPEC {spec!r}: expected SOURCE:NAME")
    if source == "torchvision":
        import torchvision

        try:
            obj: Any = torchvision.models.get_model_builder(name)
        except ValueError as e:
            raise SpecError(
                f"torchvision has no model {name!r}; "
                f"see torchvision.models.list_models()"
            ) from e
    elif source == "timm":
        if importlib.util.find_spec("timm") is None:
            raise SpecError(f"{spec!r} needs timm: pip install timm")
        import timm  # type: ignore[import-not-found]

        obj = lambda: timm.create_model(name, pretrained=False)  # noqa: E731
    else:
        obj = _attribute(_import(source), name, spec)
    if callable(obj) and not isinstance(obj, nn.Module):
        try:
            obj = obj()
        except Exception as e:
            raise SpecError(f"calling {spec} failed: {type(e).__name__}: {e}") from e
    if not isinstance(obj, nn.Module):
        raise SpecError(f"{spec} is a {type(obj).__name__}, not an nn.Module")
    return obj


def _import(source: str) -> Any:
    if source.endswith(".py") or "/" in source:
        path = Path(source)
        if not path.is_file():
            raise SpecError(f"no such file: {source}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise SpecError(f"cannot import {source}")
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, str(path.parent.resolve()))  # its sibling imports
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise SpecError(f"importing {source}: {type(e).__name__}: {e}") from e
        finally:
            sys.path.pop(0)
        return module
    try:
        return importlib.import_module(source)
    except Exception as e:
        raise SpecError(f"cannot import {source}: {type(e).__name__}: {e}") from e


def _attribute(module: Any, name: str, spec: str) -> Any:
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"{spec}: {module.__name__} has no attribute {name!r}")
        obj = getattr(obj, part)
    return obj


def _random_input(text: str | None) -> tuple[Any, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise SpecError(f"--input-shape {text!r}: expected sizes like 2,3,224,224")
    import torch

    return (torch.randn(shape),)


if __name__ == "__main__":
    sys.exit(main())
