"""The documents name only what exists, and describe the product as it is.

Every recipe file, ``adamerge`` subcommand, benchmark script, ``python -m`` module, notebook and
local link named in README.md or docs/*.md must exist (CHANGELOG.md is history and may name
what is gone); the README stays short enough to read, and no document tells its own history.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from adamerge.app.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260
HISTORY_WORDS = ("this round", "previous round", "previous landing", "no longer", "used to")

RECIPE = re.compile(r"recipes/[\w./-]+?\.yaml")
SCRIPT = re.compile(r"\bpython3? +(benchmarks/[\w./-]+?\.py)\b")
MODULE = re.compile(r"\bpython3? +-m +([A-Za-z_][\w.]*)")
NOTEBOOK = re.compile(r"notebooks/[\w./-]+?\.ipynb")
# `adamerge fit ...` as a command: not `import adamerge as am`, `adamerge.x`, `adamerge/x` or `adamerge[x]`
SUBCOMMAND = re.compile(r"(?<![\w./-])(?<!import )(?<!from )adamerge +([a-z][\w-]*)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def code_of(text: str) -> str:
    """The fenced blocks and inline code spans of a Markdown text: where commands are written."""
    blocks = FENCE.findall(text)
    return "\n".join(blocks + INLINE.findall(FENCE.sub("", text)))


def named(pattern: re.Pattern, text: str) -> set[str]:
    return {match.group(1) if pattern.groups else match.group(0) for match in pattern.finditer(text)}


def all_named(pattern: re.Pattern, in_code: bool = False) -> dict[str, set[str]]:
    """name -> the documents naming it."""
    found: dict[str, set[str]] = {}
    for document in DOCUMENTS:
        text = document.read_text()
        for name in named(pattern, code_of(text) if in_code else text):
            found.setdefault(name, set()).add(document.name)
    return found


def is_subcommand(name: str) -> bool:
    """Whether the CLI's own parser accepts ``adamerge <name> --help``."""
    try:
        main([name, "--help"])
    except SystemExit as done:
        return done.code == 0
    return False


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, code marks and punctuation dropped, spaces as '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    text = FENCE.sub("", document.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_the_documents_name_what_they_are_checked_for():
    """The patterns find the names the documents are known to hold, so an empty check cannot pass."""
    assert "recipes/text/recommended.yaml" in all_named(RECIPE)
    assert {"fit", "merge", "eval", "quickstart", "init"} <= set(all_named(SUBCOMMAND, in_code=True))
    assert "benchmarks/text_benchmark.py" in all_named(SCRIPT)
    assert "notebooks/custom_objective.ipynb" in all_named(NOTEBOOK)
    assert all_named(MODULE)
    assert not named(SUBCOMMAND, "import adamerge as am; from adamerge import x; adamerge.methods; adamerge/app")


def test_named_recipes_exist():
    missing = {name: docs for name, docs in all_named(RECIPE).items() if not (ROOT / name).is_file()}
    assert not missing, f"recipes named but absent: {missing}"


def test_named_subcommands_exist(capsys):
    missing = {name: docs for name, docs in all_named(SUBCOMMAND, in_code=True).items() if not is_subcommand(name)}
    capsys.readouterr()
    assert not missing, f"adamerge subcommands named but unknown to adamerge/app/cli.py: {missing}"


def test_named_benchmark_scripts_exist():
    missing = {name: docs for name, docs in all_named(SCRIPT).items() if not (ROOT / name).is_file()}
    assert not missing, f"scripts named but absent: {missing}"


def test_named_modules_exist(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # `python -m` runs from the repository root
    missing = {}
    for name, docs in all_named(MODULE).items():
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            missing[name] = docs
    assert not missing, f"modules named after `python -m` but not importable from {ROOT}: {missing}"


def test_named_notebooks_exist():
    missing = {name: docs for name, docs in all_named(NOTEBOOK).items() if not (ROOT / name).is_file()}
    assert not missing, f"notebooks named but absent: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=[d.name for d in DOCUMENTS])
def test_local_links_resolve(document):
    """Every relative link points at a file that exists, and its #anchor at one of that file's headings."""
    broken = []
    for target in named(LINK, FENCE.sub("", document.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{document.name}: broken links {broken}"


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


@pytest.mark.parametrize("document", DOCUMENTS, ids=[d.name for d in DOCUMENTS])
def test_no_history_telling(document):
    """Documents state what is; what changed belongs in CHANGELOG.md."""
    text = document.read_text().lower()
    told = [word for word in HISTORY_WORDS if word in text]
    assert not told, f"{document.name} tells history ({told}): state what is, or move it to CHANGELOG.md"
