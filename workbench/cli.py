"""The command line: a thin layer over the Python API.

    workbench collect RECIPE [key=value ...]     activations -> HDF5 cache
    workbench inspect CACHE                      what a cache holds, with its sink statistics

User errors (WorkbenchError) print one line and exit 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from workbench.errors import WorkbenchError


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (e.g. recipes/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. collect.batch_size=8")


def cmd_collect(args: argparse.Namespace) -> int:
    from workbench.collect import collect
    from workbench.config import load_recipe

    collect(load_recipe(args.recipe, args.overrides))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from workbench.inspect_cache import describe

    print(describe(args.cache, top=args.top))
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, Callable[[argparse.ArgumentParser], None]]] = {
    "collect": (cmd_collect, "collect resid_post activations into an HDF5 cache", _recipe_args),
    "inspect": (cmd_inspect, "summarise a cache, with its sink statistics",
                lambda p: (p.add_argument("cache"), p.add_argument("--top", type=int, default=10,
                                                                    help="most frequent sink tokens to list"))),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except WorkbenchError as err:
        print(f"workbench {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"workbench {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
