"""The package's import graph, read from the source: stages import only downwards, no module
imports itself through others, and imports inside functions are kept for optional dependencies.

The stage order is the README's architecture section; a new module belongs to one of these.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# lowest first; a module may import modules of its own stage or of stages before it
STAGES = [
    ["fewshot", "fewshot.errors", "fewshot.io", "fewshot.precision"],
    ["fewshot.data"],
    ["fewshot.config"],
    ["fewshot.episodes"],
    ["fewshot.backbones"],
    ["fewshot.decision"],
    ["fewshot.learners"],
    ["fewshot.training"],
    ["fewshot.artifacts"],
    ["fewshot.distill"],
    ["fewshot.service"],
    ["fewshot.workflows"],
    ["fewshot.cli", "fewshot.__main__"],
]
# imports inside functions that stay there, and why
LAZY_ALLOWED = {
    ("fewshot.service.http.routes.export", "fewshot.service.standalone"): "pulls in the onnx package only when a workspace is exported",
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "fewshot").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


def _stage(module: str) -> int:
    best = None
    for i, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{module} belongs to no stage; add it to STAGES and to the README's architecture"
    return best[0]


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every fewshot import of `module`."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names: list[str] = []
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [f"{child.module}.{a.name}" for a in child.names] + [child.module]
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            targets = {t for n in names if n.startswith("fewshot") and (t := _resolve(n)) and t != module}
            # `from fewshot.x import y` names module fewshot.x.y when y is a module, else fewshot.x
            if isinstance(child, ast.ImportFrom) and child.module:
                sub = {t for t in targets if t != child.module and t.startswith(child.module + ".")}
                targets = sub | ({_resolve(child.module)} - {None, module} if len(sub) < len(child.names) else set())
            found.extend((t, child.lineno, in_function) for t in sorted(t for t in targets if t))
            visit(child, inner)

    visit(tree, False)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_belongs_to_a_stage() -> None:
    for m in MODULES:
        _stage(m)


def arrows_up(graph: dict[str, list[tuple[str, int, bool]]]) -> list[str]:
    """`module:line imports target` for every import of a later stage (benchmarks/bench_architecture.py too)."""
    return [f"{m}:{line} imports {t}" for m, edges in graph.items() for t, line, _ in edges if _stage(t) > _stage(m)]


def import_cycles(graph: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    """Import cycles between modules (benchmarks/bench_architecture.py reports them too)."""
    edges = {m: {t for t, _, _ in graph[m]} for m in graph}
    # a package's __init__ re-exports its modules: those edges point down into it, not around
    edges = {m: {t for t in ts if not m or not t.startswith(m + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                walk(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    return cycles


def test_no_stage_imports_a_later_one() -> None:
    assert arrows_up(GRAPH) == []


def test_no_import_cycles_between_modules() -> None:
    assert import_cycles(GRAPH) == []


def test_imports_inside_functions_are_only_the_listed_ones() -> None:
    lazy = {(m, t) for m, edges in GRAPH.items() for t, _, inside in edges if inside}
    assert lazy == set(LAZY_ALLOWED)


@pytest.mark.parametrize("module", ["fewshot.service", "fewshot.service.app", "fewshot.service.http.app", "fewshot.service.recogniser"])
def test_the_service_never_imports_training_code(module: str) -> None:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [t for t, _, _ in GRAPH[m]]
    assert not {m for m in seen if m.startswith(("fewshot.training", "fewshot.distill", "fewshot.learners"))}


def test_the_graph_is_read_from_the_source() -> None:
    """The checks above are only as good as the graph: known edges must be in it."""
    edges = {m: {t for t, _, _ in GRAPH[m]} for m in MODULES}
    assert "fewshot.artifacts.export" in edges["fewshot.workflows.pipeline"]
    assert "fewshot.training.data" in edges["fewshot.artifacts.export"]
    assert "fewshot.decision.served" in edges["fewshot.decision"]  # a package re-exporting its modules
    assert ("fewshot.service.standalone", 0, True) not in GRAPH["fewshot.service.http.routes.export"]
    assert any(t == "fewshot.service.standalone" and inside for t, _, inside in GRAPH["fewshot.service.http.routes.export"])
