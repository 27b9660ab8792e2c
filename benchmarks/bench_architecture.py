"""The shape of the source (issue 17's measured targets), read from src/fewshot with `ast`: the
number of modules, the modules over 400 lines, the functions over 60 lines (the CLI's argument
table exempt, and named as such), the `type: ignore` comments, the import cycles and arrows back up
of the stage order, and every import inside a function.

The import graph and the stage order are those of tests/architecture/test_import_graph.py
(imported from it), so this report and that test read the same graph. Nothing is enforced here.

    python benchmarks/bench_architecture.py [--out benchmarks/results/architecture.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "architecture"))

import test_import_graph as graph  # noqa: E402  (the test's graph reading and stage order)

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
EXEMPT_FUNCTIONS = {"fewshot.cli.parser.build_parser": "the CLI's argument table"}


def _functions(tree: ast.Module, module: str) -> list[tuple[str, int, int]]:
    """(qualified name, first line, lines) of every function and method, nested ones included."""
    out: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out.append((name, child.lineno, (child.end_lineno or child.lineno) - child.lineno + 1))
                visit(child, name)

    visit(tree, module)
    return out


def _imports_inside_functions(tree: ast.Module, module: str) -> list[dict[str, Any]]:
    """Every import statement inside a function: where, what, and whether it is fewshot's own."""
    out: list[dict[str, Any]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if function is not None and isinstance(child, ast.Import | ast.ImportFrom):
                names = ([a.name for a in child.names] if isinstance(child, ast.Import)
                         else [f"{child.module}.{a.name}" for a in child.names])
                for name in names:
                    out.append({"module": module, "function": function, "line": child.lineno, "imports": name,
                                "fewshot": name.startswith("fewshot")})
            visit(child, inner)

    visit(tree, None)
    return out


def measure() -> dict[str, Any]:
    modules = graph.MODULES  # src/fewshot, as the test reads it
    lines: dict[str, int] = {}
    long_functions, exempt, lazy, ignores = [], [], [], []
    for module, path in sorted(modules.items()):
        text = path.read_text(encoding="utf-8")
        lines[module] = len(text.splitlines())
        tree = ast.parse(text)
        for name, first, n in _functions(tree, module):
            if n > MAX_FUNCTION_LINES:
                row = {"function": name, "line": first, "lines": n}
                if name in EXEMPT_FUNCTIONS:
                    exempt.append({**row, "why": EXEMPT_FUNCTIONS[name]})
                else:
                    long_functions.append(row)
        lazy += _imports_inside_functions(tree, module)
        ignores += [{"module": module, "line": i, "comments": line.count("type: ignore")}
                    for i, line in enumerate(text.splitlines(), 1) if "type: ignore" in line]
    allowed = set(graph.LAZY_ALLOWED)
    for row in lazy:
        target = graph._resolve(row["imports"]) if row["fewshot"] else None
        row["allowed"] = (not row["fewshot"]) or (row["module"], target) in allowed
    return {
        "modules": len(modules),
        "lines": sum(lines.values()),
        "largest_modules": [{"module": m, "lines": n} for m, n in sorted(lines.items(), key=lambda kv: -kv[1])[:10]],
        "modules_over_400_lines": [{"module": m, "lines": n} for m, n in sorted(lines.items(), key=lambda kv: -kv[1])
                                   if n > MAX_MODULE_LINES],
        "functions_over_60_lines": sorted(long_functions, key=lambda r: -r["lines"]),
        "functions_over_60_lines_exempt": exempt,
        "type_ignore": sum(r["comments"] for r in ignores),
        "type_ignore_by_module": ignores,
        "import_cycles": graph.import_cycles(graph.GRAPH),
        "arrows_back_up": graph.arrows_up(graph.GRAPH),
        "imports_inside_functions": lazy,
    }


def table(r: dict[str, Any]) -> str:
    own = [x for x in r["imports_inside_functions"] if x["fewshot"]]
    rows = [
        ("modules", str(r["modules"])),
        ("lines", str(r["lines"])),
        (f"modules over {MAX_MODULE_LINES} lines", str(len(r["modules_over_400_lines"]))),
        (f"functions over {MAX_FUNCTION_LINES} lines", str(len(r["functions_over_60_lines"]))),
        ("  exempt", ", ".join(f"{x['function']} ({x['lines']}: {x['why']})" for x in r["functions_over_60_lines_exempt"])
         or "-"),
        ("type: ignore", str(r["type_ignore"])),
        ("import cycles", str(len(r["import_cycles"]))),
        ("arrows back up", str(len(r["arrows_back_up"]))),
        ("imports inside functions", f"{len(r['imports_inside_functions'])} ({len(own)} of fewshot's own)"),
    ]
    width = max(len(k) for k, _ in rows)
    out = [f"{k:<{width}}  {v}" for k, v in rows]
    for title, items in (("modules over the limit", [f"{x['module']} {x['lines']}" for x in r["modules_over_400_lines"]]),
                         ("functions over the limit", [f"{x['function']} {x['lines']}"
                                                       for x in r["functions_over_60_lines"]]),
                         ("type: ignore", [f"{x['module']}:{x['line']}" for x in r["type_ignore_by_module"]]),
                         ("import cycles", [" -> ".join(c) for c in r["import_cycles"]]),
                         ("arrows back up", r["arrows_back_up"]),
                         ("imports inside functions", [f"{x['module']}:{x['line']} ({x['function']}) {x['imports']}"
                                                       + ("" if x["allowed"] else "  NOT LISTED")
                                                       for x in r["imports_inside_functions"]])):
        if items:
            out += ["", f"{title}:"] + [f"  {i}" for i in items]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "architecture.json")
    args = p.parse_args()
    result = measure()
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
