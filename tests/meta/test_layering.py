"""Layering: control workers and host agents never import each other, and no module cycles (lazy imports
inside functions included: a cycle hidden in a function body is still a cycle; imports only for type
checkers are not)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("provisioner", "batch_hooks", "ha")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
            for stmt in block.body
            for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name in modules and name != mod:
                    graph[mod].add(name)
    return graph


def test_control_and_agent_do_not_import_each_other() -> None:
    graph = import_graph()
    bad = [
        f"{m} -> {d}"
        for m, deps in graph.items()
        for d in deps
        if (m.startswith("provisioner.control") and d.startswith("provisioner.agent"))
        or (m.startswith("provisioner.agent") and d.startswith("provisioner.control"))
    ]
    assert bad == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    # Package __init__ modules re-export their children; an edge child -> parent package is not a cycle
    # of code, so drop edges into a module's own ancestors.
    for m, deps in graph.items():
        deps -= {d for d in deps if m.startswith(d + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d) :], d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == []
