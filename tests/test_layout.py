"""The package layout: layers that only import downward, no import cycle, every module says what it owns, the
layout page names every package and module."""

import ast
import re
from pathlib import Path

from conftest import repo_root

PKG = repo_root() / "mpq"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the mpq modules it imports, at module level and inside functions alike."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mpq"):
                targets = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("mpq")]
            for t in targets:
                r = resolve(t)
                if r and r != m:
                    graph[m].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


# Top to bottom. A module belongs to the layer of its longest matching prefix; it may import its own layer and the
# layers below it, never one above (imports inside functions count the same as at module level).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("entry", ("mpq", "mpq.__main__", "mpq.api", "mpq.commands")),
    (
        "stages",
        (
            "mpq.calibration",
            "mpq.sensitivity",
            "mpq.search",
            "mpq.selection",
            "mpq.final",
            "mpq.report",
            "mpq.trace",
            "mpq.export",
            "mpq.shapes.train",
        ),
    ),
    (
        "model",
        (
            "mpq.families",
            "mpq.models",
            "mpq.quant",
            "mpq.layers",
            "mpq.plan",
            "mpq.cost",
            "mpq.metrics",
            "mpq.images",
            "mpq.prompts",
            "mpq.data",
            "mpq.shapes",
        ),
    ),
    ("infra", ("mpq.runner", "mpq.errors")),
)
# The upward imports that remain, each with why (at most five; each must still exist, so the list cannot rot).
UPWARD_ALLOWED = {
    ("mpq.runner.config", "mpq.quant.formats"): "weight-format names are a registry of classes: the config asks it",
}


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[0]


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) pairs where the imported module sits in a higher layer than the importer."""
    return {(m, t) for m, targets in graph.items() for t in targets if layer_of(t) < layer_of(m)}


def test_layers_import_only_downward():
    found = upward_imports(import_graph())
    assert found <= set(UPWARD_ALLOWED), (
        f"imports from a lower layer to a higher one: {sorted(found - set(UPWARD_ALLOWED))}"
    )
    assert set(UPWARD_ALLOWED) <= found, (
        f"allowed upward imports that no longer exist: {sorted(set(UPWARD_ALLOWED) - found)}"
    )
    assert len(UPWARD_ALLOWED) <= 5
    # the checker finds one: the run directory (infra) asking a stage, and a function-level import of a command
    planted = {"mpq.runner.rundir": {"mpq.selection"}, "mpq.selection": {"mpq.commands.main"}, "mpq.plan": set()}
    assert upward_imports(planted) == {("mpq.runner.rundir", "mpq.selection"), ("mpq.selection", "mpq.commands.main")}


def test_import_graph_sees_function_level_imports():
    # mpq.commands.export imports the exporter only inside its handler (to keep `mpq --help` fast)
    top_level = {
        n.module for n in ast.parse((PKG / "commands" / "export.py").read_text()).body if isinstance(n, ast.ImportFrom)
    }
    assert "mpq.export.run" not in top_level
    assert "mpq.export.run" in import_graph()["mpq.commands.export"]


def test_no_import_cycle_in_mpq():
    assert cycles(import_graph()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]  # the checker finds one


def test_every_module_says_what_it_owns():
    for name, path in _modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.split()) >= 3, f"{name} has no docstring saying what it owns"


def test_layout_page_names_every_package_and_module():
    layout = (repo_root() / "docs" / "layout.md").read_text()
    for name in _modules():
        if name == "mpq" or name.startswith(("mpq.data", "mpq.models.weights")):
            continue
        leaf = name.rsplit(".", 1)[-1]
        assert re.search(rf"\b{re.escape(leaf)}(/|\.py)", layout), f"README's layout does not name {name}"
