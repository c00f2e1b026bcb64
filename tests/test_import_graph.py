"""The import graph of emo_jax: no circle, and dependencies that point down.

Every module under emo_jax/ is parsed (nothing is imported) and each `emo_jax.*` import, at
any level (module top or inside a function), is an edge. Layers: emo_jax.model imports nothing
of emo_jax outside itself; training (emo_jax.train) never imports the modular tools
(emo_jax.modular); the tools never import the training package.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "emo_jax"

# Circles known and being removed (each a set of modules); empty when there is none.
KNOWN_CIRCLES: list[set[str]] = []
# (tool, emo_jax.train module) imports known and being removed; empty when there is none.
KNOWN_TOOL_TRAIN_IMPORTS: set[tuple[str, str]] = set()
# Modules that are tools: they read checkpoints, never train.
TOOLS = ("emo_jax.modular", "emo_jax.interop", "emo_jax.eval", "emo_jax.extract",
         "emo_jax.select", "emo_jax.generate", "emo_jax.compose", "emo_jax.convert",
         "emo_jax.analyze")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The emo_jax modules that module `name` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import emo_jax.a.b` of a missing b
                target = target.rpartition(".")[0]
            if _within(target, "emo_jax") and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_known_edges():
    graph = _graph()
    assert "emo_jax.model_files" in graph["emo_jax.train.checkpoint"]
    assert "emo_jax.model.transformer" in graph["emo_jax.model_files"]
    assert "emo_jax.parallel" in graph["emo_jax.cli"]  # `from emo_jax import parallel`
    assert "emo_jax.data" in graph["emo_jax.modular.runtime"]  # a name of the package


def test_no_import_circle():
    circles = [c for c in _circles(_graph()) if c not in KNOWN_CIRCLES]
    assert not circles, f"import circles among emo_jax modules: {circles}"


def test_model_imports_nothing_above_it():
    graph = _graph()
    wrong = {(m, t) for m, targets in graph.items() if _within(m, "emo_jax.model")
             for t in targets if not _within(t, "emo_jax.model")}
    assert not wrong, f"emo_jax.model imports from outside emo_jax.model: {sorted(wrong)}"


def test_training_never_imports_the_modular_tools():
    graph = _graph()
    wrong = {(m, t) for m, targets in graph.items() if _within(m, "emo_jax.train")
             for t in targets if _within(t, "emo_jax.modular")}
    assert not wrong, f"emo_jax.train imports emo_jax.modular: {sorted(wrong)}"


def test_tools_never_import_training():
    graph = _graph()
    wrong = {(m, t) for m, targets in graph.items() if any(_within(m, p) for p in TOOLS)
             for t in targets if _within(t, "emo_jax.train")}
    assert not wrong - KNOWN_TOOL_TRAIN_IMPORTS, (
        f"tools import emo_jax.train: {sorted(wrong - KNOWN_TOOL_TRAIN_IMPORTS)}")
