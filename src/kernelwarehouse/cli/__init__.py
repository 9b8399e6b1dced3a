"""The ``kw`` command. Each sub-command lives in a module of this package with ``add_parser``."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("models", "train", "eval", "demo", "inspect", "recipes", "bench")


class CommandError(Exception):
    """A user error: printed as one line on stderr, exit code 2, no traceback."""


def add_command(sub: argparse._SubParsersAction, name: str, help: str, doc: str) -> argparse.ArgumentParser:
    """The parser of sub-command ``name``: ``help`` in ``kw --help``, its module's docstring ``doc``
    as the description of ``kw NAME --help``, kept as written."""
    return sub.add_parser(
        name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_switch(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """An on/off option, ``--flag`` / ``--no-flag``; None where neither is given."""
    parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kw", description="KernelWarehouse: models, training and tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (CommandError, ValueError, KeyError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"kw {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
