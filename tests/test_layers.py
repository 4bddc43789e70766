"""The package's layers import only downward, and no module imports itself back in a cycle.

Layers, bottom to top: io → core → methods, tasks → objectives → learning → zoo → app
(``adamerge/__init__.py`` re-exports the core for users). A module may import its own layer
and the ones below it; the check reads every ``import`` statement, at any depth, with ``ast``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "adamerge"
RANK = {"io": 0, "core": 1, "methods": 2, "tasks": 2, "objectives": 3, "learning": 4, "zoo": 5, "app": 6}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(path: Path, name: str) -> set[str]:
    """Every adamerge module ``path`` imports (``from adamerge.x import y`` counts x, and x.y when
    that is a module)."""
    names = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("adamerge")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.startswith("adamerge"):
                names.add(source)
                names |= {f"{source}.{a.name}" for a in node.names}
    return names


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def test_every_module_belongs_to_a_layer():
    loose = [n for n, p in modules().items() if n.count(".") == 1 and p.name != "__init__.py" and layer(n) is None
             and n not in ("adamerge.__main__",)]
    assert loose == [], f"modules outside the layers: {loose}"


def test_layers_import_downward_only():
    known = modules()
    wrong = []
    for name, path in known.items():
        here = layer(name)
        if here is None:
            continue
        for target in imported(path, name):
            there = layer(target)
            if target in known and there is not None and RANK[there] > RANK[here]:
                wrong.append(f"{name} imports {target}")
    assert wrong == []


def import_graph(known: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the modules importing it runs. Importing ``a.b.c`` runs the ``__init__`` of every
    package above it that is not already running (the importer's own packages are: Python starts a
    package before its submodules), so those packages are edges too. A package's ``__init__``
    importing its own submodules, and a submodule importing names from its package, are edges
    like any other."""
    graph = {}
    for name, path in known.items():
        running = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        targets = set()
        for target in imported(path, name):
            parts = target.split(".")
            targets |= {target} | ({".".join(parts[:i]) for i in range(1, len(parts))} - running)
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle in ``graph`` (its modules, the first repeated at the end), or ``[]``."""
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [nxt]):
                return True
        state[node] = 2
        return False

    for start in sorted(graph):
        if state.get(start) is None and visit(start, [start]):
            break
    return cycle


def test_no_import_cycles():
    cycle = find_cycle(import_graph(modules()))
    assert cycle == [], " -> ".join(cycle)


def test_the_cycle_check_sees_a_package_init_importing_back(tmp_path):
    """A package's ``__init__`` importing a submodule that imports from the package is a cycle;
    the submodule importing a sibling module instead is not, nor is importing its own package's
    sibling from outside while the ``__init__`` imports only downward."""
    package = tmp_path / "adamerge" / "objectives"
    package.mkdir(parents=True)
    (package / "base.py").write_text("import torch\n")
    (package / "entropy.py").write_text("from adamerge.objectives import Objective\n")
    (package / "__init__.py").write_text("from adamerge.objectives.base import Objective\nfrom adamerge.objectives import entropy\n")
    known = {"adamerge.objectives": package / "__init__.py", "adamerge.objectives.base": package / "base.py",
             "adamerge.objectives.entropy": package / "entropy.py"}
    assert find_cycle(import_graph(known)) == ["adamerge.objectives", "adamerge.objectives.entropy", "adamerge.objectives"]
    (package / "entropy.py").write_text("from adamerge.objectives.base import Objective\n")
    assert find_cycle(import_graph(known)) == []
    outside = tmp_path / "adamerge" / "learning.py"
    outside.write_text("from adamerge.objectives.base import Objective\n")
    (package / "base.py").write_text("from adamerge.learning import fit\n")
    known["adamerge.learning"] = outside
    assert find_cycle(import_graph(known)) == [  # importing base from outside runs the package's __init__ first
        "adamerge.learning", "adamerge.objectives", "adamerge.objectives.base", "adamerge.learning"]


@pytest.mark.parametrize("bad, good", [("adamerge.app.runner", "adamerge.core.merged")])
def test_the_check_would_see_an_upward_import(tmp_path, bad, good):
    """The checker itself: a core module importing the app is reported."""
    module = tmp_path / "probe.py"
    module.write_text(f"import torch\nfrom {bad} import fit\nfrom {good} import MergedModel\n")
    found = imported(module, "adamerge.core.probe")
    assert bad in found and good in found
    assert RANK[layer(bad)] > RANK[layer("adamerge.core.probe")]


def test_every_package_is_installed():
    """pyproject.toml lists packages explicitly (recipes/ ships as adamerge.recipes): a new
    subpackage missing there would be absent from a wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found - listed == set()
