"""The package's shape holds: stages meet only through artifacts, the model layer and the store's read API.

Walks every module's imports with ``ast`` (nothing is imported), so a new edge that breaks the rule fails here
with the file and line, instead of surfacing later as an import circle or a stage reaching into another's internals.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import adaptive_ft

ROOT = Path(adaptive_ft.__file__).parent
BOTTOM = {"adaptive_ft", "config", "errors", "metrics", "console", "files", "text"}
SHARED = {"artifacts", "lm"}
STAGES = {"store", "simulate", "prioritize", "finetune", "export", "evaluate", "review", "report"}
SAME_STAGE = {"models": "lm"}  # adaptive_ft.models: the contract's import path, re-exporting lm.models
ORCHESTRATORS = {"loop", "demo", "cli"}
STORE_READ_API = {"adaptive_ft.store", "adaptive_ft.store.db", "adaptive_ft.store.stats", "adaptive_ft.store.traffic"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = modules()


def resolve(module: str, names: list[str]) -> list[str]:
    """``from adaptive_ft.report import plots`` imports the module ``adaptive_ft.report.plots``."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return subs + ([module] if len(subs) < len(names) else [])


def project_imports(path: Path) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, inside a function, the source lines around it) for every adaptive_ft import."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets: list[str] = []
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("adaptive_ft"):
                targets = resolve(child.module, [a.name for a in child.names])
            elif isinstance(child, ast.Import):
                targets = [a.name for a in child.names if a.name.startswith("adaptive_ft")]
            for t in targets:
                context = "\n".join(lines[max(0, child.lineno - 2):child.end_lineno])
                found.append((t, child.lineno, in_function, context))
            visit(child, inner)

    visit(tree, False)
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return "adaptive_ft" if len(parts) == 1 else parts[1]


def allowed(importer: str, imported: str) -> bool:
    src, dst = layer_of(importer), layer_of(imported)
    src, dst = SAME_STAGE.get(src, src), SAME_STAGE.get(dst, dst)
    if src == dst or dst in BOTTOM:
        return True
    if src in BOTTOM:
        return False
    if src == "artifacts":
        return False
    if src == "lm":
        return dst == "artifacts"
    if src in STAGES:
        return dst in SHARED or imported in STORE_READ_API
    return src in ORCHESTRATORS and dst not in ("demo", "cli") or (src == "cli" and dst == "demo")


def edges() -> list[tuple[str, str, int, bool, str]]:
    return [(name, t, line, inner, ctx) for name, path in MODULES.items()
            for t, line, inner, ctx in project_imports(path)]


def test_no_stage_imports_another_stage() -> None:
    bad = [f"{MODULES[a].relative_to(ROOT.parent)}:{line}: {a} imports {b}" for a, b, line, _, _ in edges()
           if not allowed(a, b)]
    assert bad == [], "layer rule broken (see docs/contracts.md, 'Package layout'):\n" + "\n".join(bad)


def test_the_rule_catches_a_stage_reaching_into_another() -> None:
    assert not allowed("adaptive_ft.evaluate", "adaptive_ft.finetune.trainer")
    assert not allowed("adaptive_ft.prioritize.layers", "adaptive_ft.finetune.data")
    assert not allowed("adaptive_ft.review", "adaptive_ft.evaluate")
    assert not allowed("adaptive_ft.lm.models", "adaptive_ft.prioritize")
    assert not allowed("adaptive_ft.artifacts.run", "adaptive_ft.lm.models")
    assert not allowed("adaptive_ft.evaluate", "adaptive_ft.store.load")
    assert allowed("adaptive_ft.export.stage", "adaptive_ft.export.gguf")  # the GGUF writer is part of export
    assert allowed("adaptive_ft.evaluate", "adaptive_ft.store")
    assert allowed("adaptive_ft.loop", "adaptive_ft.evaluate")


def test_no_import_circle_between_modules() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _, inner, _ in edges():
        if not inner and b in MODULES and b != a and not a.startswith(b + "."):  # a package's own __init__ is not a circle
            graph[a].add(b)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m, [m])
    assert cycles == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_project_imports_inside_functions_only_defer_a_heavy_dependency() -> None:
    bad = [f"{MODULES[a].relative_to(ROOT.parent)}:{line}: {b}" for a, b, line, inner, ctx in edges()
           if inner and "deferred" not in ctx]
    assert bad == [], ("imports inside functions without a '# deferred: why' comment (move them to the top, or say "
                       "which heavy dependency they defer):\n" + "\n".join(bad))


@pytest.mark.parametrize("name", ["prioritize", "finetune", "report", "store", "lm", "artifacts", "export"])
def test_package_faces_hold_names_only(name: str) -> None:
    tree = ast.parse((ROOT / name / "__init__.py").read_text())
    bodies = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    assert bodies == [], f"adaptive_ft/{name}/__init__.py defines {[b.name for b in bodies]}: put them in a module"


def test_the_contracts_import_paths_still_work() -> None:
    """docs/contracts.md names these imports; the redesign moved the code, not the names scripts use."""
    from adaptive_ft.finetune.data import format_prompt
    from adaptive_ft.lm import models as lm_models
    from adaptive_ft.lm.tokens import format_prompt as tokens_format_prompt
    from adaptive_ft.models import build_tiny_model, load_model, resolve_model

    assert (build_tiny_model, load_model, resolve_model) == (lm_models.build_tiny_model, lm_models.load_model,
                                                            lm_models.resolve_model)
    assert format_prompt is tokens_format_prompt
