"""Command line: ``adamerge fit|merge|eval|quickstart|recipes|init`` (and ``--version``).

A user error (a bad recipe or input, a refused run) prints ``error: <message>`` and exits with
status 2; anything unexpected prints its traceback and exits with 1. ``--debug`` (or
``ADAMERGE_DEBUG=1``) shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from adamerge.app.config import built_in_recipes, resolve_recipe  # noqa: F401 (resolve_recipe: public here too)

PACKAGE = Path(__file__).resolve().parent.parent  # adamerge/
USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError, KeyError)  # RecipeError and UnreadableInput are ValueErrors
SIGTERM_STATUS = 128 + 15



def _print_results(title: str, run_dir: Path | None, results: dict) -> None:
    from adamerge.app.export import results_table

    if results:
        print(results_table({title: results}))
    if run_dir is not None:
        print(f"\nrun directory: {run_dir}")


def is_user_error(error: BaseException) -> bool:
    """A missing or existing file, or a ValueError/KeyError that adamerge itself raised (one raised
    deep inside a library or in your own builder is unexpected: its traceback is the clue)."""
    if isinstance(error, (FileNotFoundError, FileExistsError)):
        return True
    if not isinstance(error, USER_ERRORS):
        return False
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def _report(error: BaseException, debug: bool) -> int:
    """The exit status for an error, after saying what went wrong on stderr."""
    if isinstance(error, SystemExit):  # Lightning's SIGTERMException: it stops between steps, and would exit with 0
        print("error: stopped by SIGTERM; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return SIGTERM_STATUS
    if isinstance(error, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return 130
    user = is_user_error(error)
    if debug or not user:
        traceback.print_exception(error, file=sys.stderr)
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"error: {message}", file=sys.stderr)
    return 2 if user else 1


def main(argv: list[str] | None = None) -> int:
    debug_help = "show the traceback of user errors too (or set ADAMERGE_DEBUG=1)"
    from adamerge import __version__

    parser = argparse.ArgumentParser(prog="adamerge", description="Learn how to merge models.")
    parser.add_argument("--version", action="version", version=f"adamerge {__version__}")
    parser.add_argument("--debug", action="store_true", help=debug_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("fit", "learn merge coefficients as a recipe says, evaluate, export a run directory"),
        ("merge", "run a merge method recipe: data-free (task arithmetic, TIES, ...) or on calibration inputs (RegMean, ...)"),
    ):
        command = commands.add_parser(name, help=text, description=text, parents=[common])
        command.add_argument("recipe", nargs="?" if name == "merge" else None,
                             help="a recipe YAML file or the name of a built-in recipe" + (" (none with --from-mergekit)" if name == "merge" else ""))
        command.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=100")
        command.add_argument("--from-mergekit", metavar="YAML", help=(
            "merge what this mergekit config merges" if name == "merge" else "start the coefficients from this mergekit config's weights"))
    evaluate = commands.add_parser("eval", help="re-evaluate a finished run directory", parents=[common])
    evaluate.add_argument("run_dir")
    quickstart = commands.add_parser(
        "quickstart", help="build the digits zoo, merge it every way, print a table", parents=[common]
    )
    quickstart.add_argument("--out", default="runs/quickstart", help="where the runs go (default: runs/quickstart)")
    commands.add_parser("recipes", help="list the built-in recipes", parents=[common])
    init = commands.add_parser("init", help="write a filled-in recipe from a template", parents=[common])
    init.add_argument("kind", choices=sorted(TEMPLATES), help="the kind of models merged")
    init.add_argument("--pretrained", required=True, help="the model the experts were fine-tuned from")
    init.add_argument("--expert", action="append", required=True, metavar="NAME=PATH", help="one per expert (repeat)")
    init.add_argument("--data", action="append", default=[], metavar="NAME=PATH", help="a task's data (default: path/to/NAME)")
    init.add_argument("--out", default="recipe.yaml", help="where the recipe goes (default: recipe.yaml)")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except BaseException as error:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(error, SystemExit) and not isinstance(error, SIGTERMException):
            raise
        return _report(error, args.debug or os.environ.get("ADAMERGE_DEBUG", "") not in ("", "0"))


TEMPLATES = {"sequence_classification": "templates/sequence_classification", "causal_lm": "templates/causal_lm",
             "clip": "templates/clip"}


def write_initial_recipe(kind: str, pretrained: str, experts: list[str], data: list[str], out: Path) -> None:
    """The ``kind`` template with the pretrained model and one task per ``NAME=PATH`` expert, each
    task shaped like the template's first (its data at ``--data NAME=PATH`` or a placeholder)."""
    from omegaconf import OmegaConf

    from adamerge.app.config import load_recipe
    from adamerge.app.checks import check_name

    pairs = {}
    for flag, items in (("--expert", experts), ("--data", data)):
        for item in items:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"{flag} {item!r}: expected NAME=PATH")
            pairs.setdefault(flag, {})[check_name(name, flag)] = path
    unknown = sorted(set(pairs.get("--data", {})) - set(pairs["--expert"]))
    if unknown:
        raise ValueError(f"--data {unknown[0]}: no --expert of that name")
    template = resolve_recipe(TEMPLATES[kind])
    recipe = OmegaConf.load(template)
    shape = OmegaConf.to_container(next(iter(recipe.problem.tasks.values())))
    recipe.problem.pretrained = pretrained
    tasks = {}
    for name, path in pairs["--expert"].items():
        source = pairs.get("--data", {}).get(name, f"path/to/{name}")
        task = {**shape, "expert": path}
        for split in ("calibration", "evaluation"):
            if isinstance(task.get(split), dict):
                task[split] = {**task[split], "path": source}
        tasks[name] = task
    recipe.problem.tasks = tasks
    header = f"# adamerge fit {out}\n# Written by `adamerge init {kind}` from {template.name}; see that template for what each field does.\n"
    text = header + OmegaConf.to_yaml(recipe)
    load_recipe(OmegaConf.to_container(recipe))  # what it writes is a valid recipe
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out")
    from adamerge.io.checkpoints import write_text

    write_text(out, text)


def _recipe(args: argparse.Namespace):
    """The recipe of ``fit``/``merge``: a recipe file, or one read from a mergekit config (its notes printed)."""
    from adamerge.app.config import load_recipe

    if args.from_mergekit is None:
        if args.recipe is None:
            raise ValueError("give a recipe (or --from-mergekit merge.yml)")
        return load_recipe(resolve_recipe(args.recipe), args.overrides)
    from adamerge.app.mergekit.recipe import fit_recipe, merge_recipe

    if args.command == "fit":
        recipe, notes = fit_recipe(args.from_mergekit, args.recipe, args.overrides)
    else:  # `merge --from-mergekit m.yml key=value`: argparse takes the first override for the recipe
        recipe, notes = merge_recipe(args.from_mergekit, [args.recipe] * (args.recipe is not None) + args.overrides)
    for note in notes:
        print(f"note: {note}")
    return recipe


def _run(args: argparse.Namespace) -> int:
    if args.command == "recipes":
        print("\n".join(built_in_recipes()))
        return 0
    if args.command == "init":
        write_initial_recipe(args.kind, args.pretrained, args.expert, args.data, Path(args.out))
        print(f"wrote {args.out}: check its data paths, then run `adamerge fit {args.out}`")
        return 0
    if args.command == "quickstart":
        from adamerge.app.quickstart import run_quickstart

        run_quickstart(Path(args.out))
        return 0

    from adamerge.app import runner

    if args.command == "eval":
        results = runner.evaluate_run(args.run_dir)
        _print_results(Path(args.run_dir).name, None, results)
        print(json.dumps(results, indent=1))
        return 0
    recipe = _recipe(args)
    job = runner.fit if args.command == "fit" else runner.merge
    result = job(recipe)
    _print_results(recipe.name, result.run_dir, result.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
