"""The coupling families keep the runtime's layering: torch and the standard library
only, so a converted model of any family runs and unpickles with torch alone."""

from __future__ import annotations

import ast
from pathlib import Path

COUPLINGS = Path(__file__).resolve().parents[2] / "revcompile" / "runtime"
STDLIB = {"__future__", "collections", "contextlib", "dataclasses", "typing"}
STDLIB |= {"math", "warnings", "itertools", "fractions", "enum", "inspect"}


def test_couplings_import_only_torch_and_the_runtime() -> None:
    paths = sorted(COUPLINGS.rglob("*.py"))
    assert any(p.parent.name == "couplings" for p in paths)
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = {node.module or ""}
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                inside = name.startswith(("revcompile.runtime", "revcompile.errors"))
                assert top in STDLIB | {"torch", "threading"} or inside, (path, name)
