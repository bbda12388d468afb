"""The package's house rules, checked on the sources with ``ast``: no import cycle inside s2h/ (module
level or inside functions), no import of another module's private name, no module over 500 lines,
no function over 80 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "s2h"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def resolve(mod: str, is_pkg: bool, level: int, target: str | None) -> str:
    """The absolute module name of ``from <level dots><target> import ...`` written in ``mod``."""
    if level == 0:
        return target or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, str | None]]]:
    """Per module: (imported module, imported name or None) for every import statement, anywhere in it."""
    out: dict[str, set] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update((a.name, None) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                src = resolve(mod, path.name == "__init__.py", node.level, node.module)
                found.update((src, a.name) for a in node.names)
        out[mod] = found
    return out


def graph(mods, imps) -> dict[str, set[str]]:
    """Edges between s2h modules: ``from pkg import sub`` counts as an edge to the submodule ``pkg.sub``."""
    g = {m: set() for m in mods}
    for mod, found in imps.items():
        for src, name in found:
            target = f"{src}.{name}" if name and f"{src}.{name}" in mods else src
            if target in mods and target != mod:
                g[mod].add(target)
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(g):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def test_the_checks_can_fail():
    """The helpers find a planted cycle and resolve relative imports."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert resolve("s2h.structured.step", False, 1, "model") == "s2h.structured.model"
    assert resolve("s2h.structured", True, 1, "masks") == "s2h.structured.masks"
    assert resolve("s2h.structured.layers.conv", False, 2, "masks") == "s2h.structured.masks"


def test_no_import_cycle_in_s2h():
    mods = sources()
    g = graph(mods, imports(mods))
    assert sum(len(v) for v in g.values()) > 50  # the graph was really built
    assert find_cycle(g) is None, " -> ".join(find_cycle(g))


def test_no_private_name_imported_across_modules():
    mods = sources()
    bad = [f"{mod}: from {src} import {name}" for mod, found in imports(mods).items() for src, name in found
           if (name and name.startswith("_") and not name.startswith("__"))
           or any(part.startswith("_") and not part.startswith("__") for part in src.split("."))]
    assert not bad, bad


def test_module_and_function_sizes():
    long_modules, long_functions = [], []
    for mod, path in sources().items():
        text = path.read_text()
        if text.count("\n") > 500:
            long_modules.append((mod, text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long_functions.append((f"{mod}.{node.name}", n))
    assert not long_modules, long_modules
    assert not long_functions, long_functions


@pytest.mark.parametrize("old, name", [
    ("s2h.layers", "S2HConv2d"), ("s2h.model", "S2HModel"), ("s2h.model", "convert"), ("s2h.trainer", "TABLE5"),
    ("s2h.trainer", "S2HPruner"), ("s2h.train", "PruneConfig"), ("s2h.train", "build_model"),
    ("s2h.transformers", "S2HAttention"), ("s2h.export", "save"), ("s2h.reference", "S2HReference"),
    ("s2h.oneshot", "prune"), ("s2h.oneshot", "train"), ("s2h.flops", "FlopsTable"), ("s2h.groups", "find_groups"),
    ("s2h.demo", "train_dense"), ("s2h.plots", "plot_accuracy_vs_sparsity"),
])
def test_old_paths_reexport_with_a_deprecation_warning(old, name):
    import importlib

    mod = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} is deprecated"):
        obj = getattr(mod, name)
    assert callable(obj) or isinstance(obj, tuple)
    with pytest.raises(AttributeError):
        getattr(mod, "no_such_name")


def test_table5_reachable_at_its_new_home_and_old_path():
    from s2h.structured.step import TABLE5
    import s2h.trainer

    with pytest.warns(DeprecationWarning):
        assert s2h.trainer.TABLE5 is TABLE5
    assert [r["row"] for r in TABLE5] == list(range(1, 8))
