"""`llmesh serve SERVICE [ARGS...]`: one service in the foreground (for containers).

Delegates to the service module's ``main(argv)`` with every argument after
SERVICE, so `llmesh serve target --help` shows the target's own flags.
"""

from __future__ import annotations

import argparse
import importlib

from services.common.suite import MODULES


def run(args: argparse.Namespace) -> int:
    if args.service is None:  # the parser has no --help of its own: `serve target --help` is the target's
        if {"-h", "--help"} & set(args.rest):
            args.parser.print_help()
            return 0
        args.parser.error(f"give a service: {', '.join(sorted(MODULES))}")
    return importlib.import_module(MODULES[args.service]).main(args.rest) or 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="run one service in the foreground", add_help=False,
        description="Runs one service in the foreground (for containers); arguments after SERVICE go to the "
                    "service, so `llmesh serve target --help` shows its flags.")
    p.add_argument("service", nargs="?", choices=sorted(MODULES), help="which service")
    p.set_defaults(func=run, passthrough=True)
    return p
