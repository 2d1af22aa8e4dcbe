"""`llmesh serve SERVICE [ARGS...]`: one service in the foreground (for containers).

Delegates to the service module's ``main(argv)`` with every argument after
SERVICE, so `llmesh serve target --help` shows the target's own flags.
"""

from __future__ import annotations

import argparse
import importlib

from services.common.suite import MODULES


def run(args: argparse.Namespace) -> int:
    if args.service is None:
        args.parser.print_help()
        return 2
    return importlib.import_module(MODULES[args.service]).main(args.rest) or 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="run one service in the foreground", add_help=False,
        description="Runs one service in the foreground (for containers); arguments after SERVICE go to the "
                    "service, so `llmesh serve target --help` shows its flags.")
    p.add_argument("service", nargs="?", choices=sorted(MODULES), help="which service")
    p.set_defaults(func=run, passthrough=True, parser=p)
    return p
