"""The package's import layering: what each part may depend on."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "revcompile").rglob("*.py")) + sorted(
    (ROOT / "passes").rglob("*.py")
)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def test_runtime_imports_only_torch() -> None:
    """A converted model needs nothing but torch to run or unpickle."""
    for path in (ROOT / "revcompile" / "runtime").glob("*.py"):
        extra = _top(_imports(path)) - {"torch", "revcompile", "__future__"}
        extra -= {"collections", "contextlib", "dataclasses", "typing", "threading"}
        extra -= {"math", "functools", "itertools", "warnings", "inspect", "enum"}
        assert not extra, f"{path.name} imports {extra}"
        inside = {n for n in _imports(path) if n.startswith("revcompile.")}
        allowed = ("revcompile.runtime.", "revcompile.errors")
        assert all(n.startswith(allowed) for n in inside), (path.name, inside)


def test_one_networkx_module_and_rich_only_in_report_and_cli() -> None:
    nx = [p.name for p in SOURCES if "networkx" in _top(_imports(p))]
    assert len(nx) <= 1, nx
    rich = [p.relative_to(ROOT) for p in SOURCES if "rich" in _top(_imports(p))]
    assert all(p.parts[-1] in {"report.py", "cli.py"} for p in rich), rich


def test_no_top_level_passes_import() -> None:
    """passes/ is installed as revcompile.passes; `import passes` must never appear."""
    for path in SOURCES + sorted((ROOT / "tests").rglob("*.py")):
        assert "passes" not in _top(_imports(path)), path
