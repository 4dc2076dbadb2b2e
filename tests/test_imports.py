"""The import graph of lu2k points one way.

Read from the source with ``ast`` (every ``import`` statement, including those inside
functions and under ``TYPE_CHECKING``): no cycles among lu2k's modules at run time (an import
only for the type checker, under ``TYPE_CHECKING``, is no cycle); the product (daemon,
engine, core, config, backends, shim, ...) never imports the tools around it (the lab, the
CLI, ``localpair``), a simulator, or ``benchmarks``; the lab never imports the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lu2k"
TOOLS = ("lu2k.lab", "lu2k.cli", "lu2k.localpair")


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement loads (``from .x import y`` is ``x.y`` if that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _type_checking_imports(tree: ast.AST) -> set[int]:
    """ids of the import statements under ``if TYPE_CHECKING:`` (never run)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
            (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
            or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
        ):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return out


def import_graph(*, runtime_only: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        edges = graph.setdefault(name, set())
        tree = ast.parse(path.read_text(), str(path))
        typing_only = _type_checking_imports(tree) if runtime_only else set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only:
                edges.update(t for t in _targets(name, node) if t != name and (t in MODULES or t.split(".")[0] == "benchmarks"))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _is_tool(name: str) -> bool:
    return any(name == t or name.startswith(t + ".") for t in TOOLS)


def _is_simulator(name: str) -> bool:
    parts = name.split(".")
    return "sim" in parts[1:] or parts[0] == "benchmarks"


def test_the_graph_is_read() -> None:
    g = import_graph()
    assert "lu2k.settings" in g["lu2k.daemon"] and "lu2k.confctl" in g["lu2k.daemon"]
    assert "lu2k.nid" in g["lu2k.config"] and "lu2k.lab.spec" in g["lu2k.cli.lab"]


def test_no_import_cycles() -> None:
    assert cycles(import_graph(runtime_only=True)) == []


def test_type_checking_imports_are_no_cycle_but_are_read() -> None:
    assert "lu2k.core.node" in import_graph()["lu2k.core.actions"]  # annotations name the node's types
    assert "lu2k.core.node" not in import_graph(runtime_only=True)["lu2k.core.actions"]


def test_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_product_never_imports_tools_or_simulators() -> None:
    bad = [
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        if not _is_tool(m) and not _is_simulator(m)
        for t in sorted(targets)
        if _is_tool(t) or _is_simulator(t)
    ]
    assert bad == []


def test_lab_never_imports_the_cli() -> None:
    bad = [f"{m} -> {t}" for m, targets in import_graph().items() if m.startswith("lu2k.lab") for t in targets if t.startswith("lu2k.cli")]
    assert bad == []
