"""The shape of the house: no import cycle inside ``tpp_plugin`` (module-level and
function-local imports alike), no module over 700 lines, framework-neutral modules that never
import an adapter, and function-local imports of the package's own modules only where an optional
framework needs them (they are how cycles hide). Read from the source with ``ast``."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tpp_plugin"
MAX_LINES = 700


def _modules() -> dict:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path, mods: dict):
    """``(imported module, is function-local)`` for every import of a package module."""
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                       for a in node.names]
        for target in targets:
            resolved = _resolve(target, mods)
            if resolved is not None and resolved != name:
                yield resolved, id(node) in local


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_the_package():
    mods = _modules()
    graph = {m: {t for t, _ in _imports(m, p, mods)} for m, p in mods.items()}
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_over_700_lines():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("root", ["engine", "contract", "count_domain", "stats", "functional"])
def test_framework_neutral_modules_do_not_import_the_adapters(root):
    mods = _modules()
    name = f"tpp_plugin.{root}"
    inside = [m for m in mods if m == name or m.startswith(name + ".")]
    for module in inside:
        for target, _ in _imports(module, mods[module], mods):
            assert not target.startswith("tpp_plugin.adapters"), (module, target)


def test_function_local_imports_only_for_optional_frameworks():
    """Inside the package, a function imports another package module only when that module
    needs an optional framework (the adapters); everything else is imported at module level,
    where a cycle cannot hide."""
    mods = _modules()
    local = sorted({(m, target) for m, p in mods.items()
                    for target, is_local in _imports(m, p, mods)
                    if is_local and not target.startswith("tpp_plugin.adapters")})
    assert local == []
