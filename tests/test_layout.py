"""The package layout is the architecture (docs/index.md): imports point one way, no circles.

Static checks over the source (every ``import``, function-level ones included; ``TYPE_CHECKING``
blocks excluded, they never run): no import cycle between modules, every package depends only on
the packages below it, every package states what it owns in a docstring, and the top level holds
only the entry points.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlmpress"

#: package -> the vlmpress packages it may import (docs/index.md, "Architecture")
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "core": {"errors"},
    "io": {"errors"},
    "deploy": {"core", "io", "errors"},
    "data": {"core", "io", "errors"},
    "adapters": {"core", "data", "io", "errors"},
    "pipeline": {"deploy", "adapters", "data", "core", "io", "errors"},
    "reference": {"adapters", "data", "core", "io", "errors"},
    "evaluation": {"pipeline", "deploy", "reference", "adapters", "data", "core", "io", "errors"},
    "testing": {"evaluation", "pipeline", "deploy", "reference", "adapters", "data", "core", "io", "errors"},
    "api": {"pipeline", "adapters", "data", "core", "io", "errors"},
    "commands": {"api", "testing", "evaluation", "pipeline", "deploy", "reference", "adapters", "data", "core", "io", "errors"},
    "cli": {"commands", "api", "adapters", "errors"},
    "__main__": {"cli"},
    "__init__": {"api", "pipeline", "adapters", "core", "errors"},
}
TOP_LEVEL_MODULES = {"__init__", "__main__", "cli", "api", "errors"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for top in ast.walk(tree) if _is_type_checking(top) for n in ast.walk(top)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _package_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop(); on.discard(w); comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    """The check above can fail: a two-module circle is reported."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_packages_import_only_downwards():
    bad = defaultdict(set)
    for module, targets in _graph().items():
        src = _package_of(module)
        for target in targets:
            dst = _package_of(target)
            if dst != src and dst not in ALLOWED[src]:
                bad[f"{src} -> {dst}"].add(f"{module} imports {target}")
    assert not bad, {k: sorted(v) for k, v in bad.items()}


def test_every_package_says_what_it_owns():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc) > 40, f"{init.relative_to(PACKAGE.parent)} has no docstring saying what it owns"


def test_top_level_holds_only_entry_points():
    loose = {p.stem for p in PACKAGE.glob("*.py")} - TOP_LEVEL_MODULES
    assert not loose, f"modules loose at vlmpress/: {sorted(loose)} (put them in the package of their stage)"
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(ALLOWED), f"packages missing from the layout table: {sorted(packages - set(ALLOWED))}"
