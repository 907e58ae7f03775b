"""The package's shape stays what a newcomer was promised: no import cycles between modules
(lazy imports inside functions included), and compresskit/ itself holds only the CLI, the API,
the errors and the registry; everything else lives in a package named for its concern."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGE = ROOT / "compresskit"


def _modules() -> dict[str, set[str]]:
    """Every module's name -> the compresskit modules it imports anywhere in its body."""
    names = {}
    for f in PACKAGE.rglob("*.py"):
        dotted = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        names[dotted.removesuffix(".__init__")] = f
    graph: dict[str, set[str]] = {}
    for name, f in names.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in names and m != name}
    return graph


def test_no_import_cycles():
    graph = _modules()
    # A package importing its own submodules (its __init__) is not a cycle between modules.
    edges = {m: {n for n in deps if not n.startswith(m + ".") and not m.startswith(n + ".")}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(
                path[path.index(n):] + [n])
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_top_level_holds_only_the_entry_points():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "api", "cli", "errors", "registry"]
