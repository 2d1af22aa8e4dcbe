"""`llmesh models build [...]`: builds the default models offline.

Delegates to ``services.models.build`` (``add_arguments(parser)`` and
``run(args) -> int``), imported only when the command runs so that
`llmesh --help` does not load torch.
"""

from __future__ import annotations

import argparse
import importlib


def run(args: argparse.Namespace) -> int:
    if args.action is None:  # the parser has no --help of its own: `build --help` is build's
        if {"-h", "--help"} & set(args.rest):
            args.parser.print_help()
            return 0
        args.parser.error("give a subcommand: build")
    build = importlib.import_module("services.models.build")
    parser = argparse.ArgumentParser(prog="llmesh models build", description=build.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_arguments(parser)
    return build.run(parser.parse_args(args.rest)) or 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="build the default target and draft models offline", add_help=False,
                              description="Subcommands: build, which makes the default tokenizer, target and "
                                          "draft models offline in HOME/models (`llmesh models build --help` "
                                          "lists its flags).")
    p.add_argument("action", nargs="?", choices=["build"], help="build: make the default models")
    p.set_defaults(func=run, passthrough=True)
    return p
