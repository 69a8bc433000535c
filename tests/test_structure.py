"""The house's shape, pinned: the package's imports run one way, scripts import as modules, one owner per protocol."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edge_runtime"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every edge_runtime module this file imports, anywhere in it (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_package_imports_have_no_circles() -> None:
    graph = package_graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            if nxt != "edge_runtime":  # the package's __init__ loads its names lazily (__getattr__)
                visit(nxt, [*path, node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    assert "edge_runtime.session" in graph and "edge_runtime.compressor" in graph["edge_runtime.session"]


def test_the_runtime_imports_no_script_and_no_script_edits_sys_path() -> None:
    for path in PACKAGE.rglob("*.py"):
        assert not any(m == "scripts" or m.startswith("scripts.") for m in imports_of(path)), path
    for path in (ROOT / "scripts").glob("*.py"):
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path: import scripts.<name> instead"


def test_only_the_compressor_makes_the_native_pass() -> None:
    """One owner per protocol: the pass is built and called in one place."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if path.name != "compressor.py":
            assert "KVPass(" not in text and ".compress(frame" not in text, path
