"""Command line: ``adamerge fit|merge|eval|quickstart|recipes``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

def _recipes_dir() -> Path:
    """The repository's recipes/ in a source checkout, else the copy installed inside the package."""
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    return checkout if checkout.is_dir() else Path(__file__).resolve().parent / "recipes"


RECIPES_DIR = _recipes_dir()


def resolve_recipe(name: str) -> Path:
    """A recipe file path, or the name of a built-in recipe (``quickstart/adamerging_layerwise``)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no recipe file {name!r}, and no built-in recipe of that name (see `adamerge recipes`)")


def built_in_recipes() -> list[str]:
    return sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))


def _print_results(title: str, run_dir: Path | None, results: dict) -> None:
    from adamerge.export import results_table

    if results:
        print(results_table({title: results}))
    if run_dir is not None:
        print(f"\nrun directory: {run_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adamerge", description="Learn how to merge models.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("fit", "learn merge coefficients as a recipe says, evaluate, export a run directory"),
        ("merge", "run a data-free merge recipe (task arithmetic, TIES, DARE, ...)"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("recipe", help="a recipe YAML file or the name of a built-in recipe")
        command.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=100")
    evaluate = commands.add_parser("eval", help="re-evaluate a finished run directory")
    evaluate.add_argument("run_dir")
    quickstart = commands.add_parser("quickstart", help="build the digits zoo, merge it every way, print a table")
    quickstart.add_argument("--out", default="runs/quickstart", help="where the runs go (default: runs/quickstart)")
    commands.add_parser("recipes", help="list the built-in recipes")
    args = parser.parse_args(argv)

    if args.command == "recipes":
        print("\n".join(built_in_recipes()))
        return 0
    if args.command == "quickstart":
        from adamerge.quickstart import run_quickstart

        run_quickstart(Path(args.out))
        return 0

    from adamerge import runner
    from adamerge.config import load_recipe

    if args.command == "eval":
        results = runner.evaluate_run(args.run_dir)
        _print_results(Path(args.run_dir).name, None, results)
        print(json.dumps(results, indent=1))
        return 0
    recipe = load_recipe(resolve_recipe(args.recipe), args.overrides)
    job = runner.fit if args.command == "fit" else runner.merge
    result = job(recipe)
    _print_results(recipe.name, result.run_dir, result.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
