"""The house's layering, read from the code's imports: what may import what, and no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: where each first-level package of ``defectloop`` lives (setuptools package-dir)
ROOTS = {"serve": ROOT / "serve", "workers": ROOT / "workers"}


def module_files() -> dict[str, Path]:
    files = {}
    for base, prefix in ((ROOT / "platform" / "defectloop", "defectloop"), (ROOTS["serve"], "defectloop.serve"),
                         (ROOTS["workers"], "defectloop.workers")):
        for f in base.rglob("*.py"):
            rel = f.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            files[".".join([prefix, *parts])] = f
    return files


def imports(f: Path) -> set[str]:
    """Every defectloop module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("defectloop"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("defectloop"))
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {m: {i for i in imports(f) if i in files and i != m} for m, f in files.items()}


def test_storage_knows_bytes(graph):
    assert not {i for i in graph["defectloop.store"] if i.startswith(("defectloop.models", "defectloop.registry"))}


def test_labeling_uses_only_the_public_model_interface(graph):
    for m, deps in graph.items():
        if m.startswith("defectloop.labeling"):
            inside = {d for d in deps if d.startswith("defectloop.models.")}
            assert not inside, f"{m} imports {inside}: use `from defectloop.models import ...`"


def test_no_import_cycles(graph):
    """Package __init__ files only hand names on, so an edge into a package counts as one into the
    module it names; a cycle is a module that reaches itself."""
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    packages = {m for m in graph if (module_files()[m].name == "__init__.py")}
    cyclic = sorted(m for m in graph if m not in packages and m in reach(m))
    assert not cyclic, f"modules in an import cycle: {cyclic}"
