"""The package's shape: layers import downward only (import-linter's contracts in pyproject.toml),
no import cycle between any two modules of ``arkfed/``, and modules small enough to read.

Every import counts: module level, inside functions and in ``TYPE_CHECKING`` blocks (a type-only
cycle is still two modules that cannot be read apart).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 450


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_arkfed():
    graph = grimp.build_graph("arkfed")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) & graph.modules for m in graph.modules}
    cycles = _cycles(edges)
    detail = "\n".join(" <-> ".join(c) for c in cycles)
    assert not cycles, f"import cycles inside arkfed/ (move the shared piece down a layer):\n{detail}"


def test_layers_import_downward_only():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    result = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"import-linter contracts (pyproject.toml) broken:\n{result.stdout[-4000:]}"


def test_no_module_is_too_long_to_read():
    long = {str(p.relative_to(REPO)): n for p in (REPO / "arkfed").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {long}"


def test_no_function_is_too_complex_to_review():
    """radon's grade C ends at cyclomatic complexity 20; figures (``plot_*``) may branch more."""
    from radon.complexity import cc_visit

    complex_functions = []
    for path in sorted((REPO / "arkfed").rglob("*.py")):
        for block in cc_visit(path.read_text()):
            if block.complexity > 20 and not block.name.startswith("plot"):
                complex_functions.append(f"{path.relative_to(REPO)}:{block.lineno} {block.name} ({block.complexity})")
    assert not complex_functions, "functions above radon grade C (split them):\n" + "\n".join(complex_functions)
