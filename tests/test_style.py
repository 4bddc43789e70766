"""Sizes that keep the code readable: a module holds one idea (≲ 400 lines), a function one step
(≲ 60 lines of body, its signature and docstring not counted). The exceptions below say why.
Tests mirror the package: every module with behaviour has its test file, and no test file imports
another (what several share is a fixture of ``tests/fixtures``, loaded by the conftest); the
conftest and the fixture modules are held to the same module size."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "adamerge"
TESTS = Path(__file__).resolve().parent
MODULE_LINES, FUNCTION_LINES = 400, 60

# module -> why it is longer
LONG_MODULES = {
}
# "module:function" -> why it is longer
LONG_FUNCTIONS: dict[str, str] = {}


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the function."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str) and len(body) > 1:
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1


def sizes():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text())
        functions = {f"{name}:{n.name}": body_lines(n) for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        yield name, len(path.read_text().splitlines()), functions


def test_modules_hold_one_idea():
    long = {name: lines for name, lines, _ in sizes() if lines > MODULE_LINES and name not in LONG_MODULES}
    assert long == {}, f"modules over {MODULE_LINES} lines without a stated reason: {long}"


def test_functions_do_one_step():
    long = {f: n for _, _, functions in sizes() for f, n in functions.items()
            if n > FUNCTION_LINES and f not in LONG_FUNCTIONS}
    assert long == {}, f"functions over {FUNCTION_LINES} lines of body without a stated reason: {long}"


def test_every_stated_exception_is_still_needed():
    measured = {name: lines for name, lines, _ in sizes()}
    functions = {f: n for _, _, fs in sizes() for f, n in fs.items()}
    stale = [m for m in LONG_MODULES if measured.get(m, 0) <= MODULE_LINES]
    stale += [f for f in LONG_FUNCTIONS if functions.get(f, 0) <= FUNCTION_LINES]
    assert stale == [], f"exceptions no longer needed: {stale}"


DOTTED_TEST_PATH = re.compile(r"(test_\w+)([:.][A-Za-z_]\w*)+")  # "test_x:Name", "test_x.Name": an import by name


def imported_test_modules(path: Path) -> set[str]:
    """The test modules (``test_*``, ``tests.*``) that ``path`` imports, by statement or by a dotted
    path in a string (a recipe's ``problem.kind`` or objective name); its own name is allowed."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = DOTTED_TEST_PATH.fullmatch(node.value)
            if match and match.group(2) != ".py":
                found.add(match.group(1))
    return {name for name in found if name == "tests" or name.startswith("test_")} - {path.stem}


def support_modules() -> list[Path]:
    """The modules under ``tests/`` that are not test files: the conftest, the fixture modules, helpers."""
    return [path for path in sorted(TESTS.rglob("*.py")) if not path.name.startswith("test_")]


def test_no_test_file_imports_another():
    modules = sorted(TESTS.glob("test_*.py")) + support_modules()
    imports = {path.relative_to(TESTS).as_posix(): sorted(found) for path in modules if (found := imported_test_modules(path))}
    assert imports == {}, f"test or support modules importing test files (share a fixture of tests/fixtures instead): {imports}"


def test_support_modules_hold_one_idea():
    long = {path.relative_to(TESTS).as_posix(): lines for path in support_modules()
            if (lines := len(path.read_text().splitlines())) > MODULE_LINES}
    assert long == {}, f"support modules of tests/ over {MODULE_LINES} lines (split them by what they build): {long}"


# module -> why it has no test file of its name
UNMIRRORED: dict[str, str] = {}


def has_behaviour(path: Path) -> bool:
    """A module defines a function or a class (re-exporting ``__init__``s and constants do not)."""
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in ast.parse(path.read_text()).body)


def mirror_names() -> dict[str, list[str]]:
    """Module (relative to the package) -> the test file names that mirror it: ``test_<module>.py``
    (a package's ``__init__`` by the package's name) for the one shallowest module of that name,
    ``test_<package>_<module>.py`` for any."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if has_behaviour(path):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts  # ("adamerge", "core", "scope")
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name, package = parts[-1], parts[-2] if len(parts) > 1 else parts[-1]
            modules[path.relative_to(PACKAGE).as_posix()] = (name, package, len(parts))
    names = {}
    for module, (name, package, depth) in modules.items():
        rivals = [d for other, (n, _, d) in modules.items() if n == name and other != module]
        alone = all(depth < d for d in rivals)  # the one shallowest module of its name
        names[module] = ([f"test_{name}.py"] if alone else []) + [f"test_{package}_{name}.py"]
    return names


def test_every_module_with_behaviour_has_its_test_file():
    missing = {module: names[0] for module, names in mirror_names().items()
               if module not in UNMIRRORED and not any((TESTS / n).exists() for n in names)}
    assert missing == {}, f"modules without a test file of their name (module: expected file): {missing}"


def test_every_stated_unmirrored_module_still_lacks_its_file():
    names = mirror_names()
    stale = [m for m in UNMIRRORED if m not in names or any((TESTS / n).exists() for n in names[m])]
    assert stale == [], f"no longer needed in UNMIRRORED: {stale}"
