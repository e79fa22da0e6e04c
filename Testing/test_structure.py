"""The core's structure: no import cycle between its modules (at any depth: lazy imports inside
functions count too), a lazy public API, and no module of the core reaching into the CLI."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LIB = REPO / "UNetSegment" / "UNetSegmentLib"


def _module_name(path: Path) -> str:
    rel = path.relative_to(LIB.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Modules of the library that ``path`` imports (absolute names), wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("UNetSegmentLib"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)  # `from . import x` imports module x
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("UNetSegmentLib"))
    return out


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts}
    graph = {}
    for name, path in files.items():
        # an import of a package's module also runs the package's __init__; only real modules are nodes
        graph[name] = {m for m in _imports(path, name) if m in files and m != name and m != "UNetSegmentLib"}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_core_modules():
    assert _cycles(import_graph()) == []


def test_core_modules_do_not_import_the_cli():
    graph = import_graph()
    users = sorted(m for m, deps in graph.items() if "UNetSegmentLib.cli" in deps)
    assert users == [], f"the CLI is an entry point, not a library: {users} import it"


def test_public_api_is_lazy_and_complete():
    code = ("import sys, UNetSegmentLib as u; assert 'torch' not in sys.modules; "
            "[getattr(u, n) for n in u.__all__]; print(sorted(u.__all__))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(LIB.parent), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "segment_files" in r.stdout and "SegmentParams" in r.stdout
