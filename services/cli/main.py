"""The `llmesh` command.

Each subcommand lives in its own module with ``add_parser(subparsers)``,
which registers its parser and sets ``func`` (``func(args) -> int``). A
module may also set ``passthrough=True``: the arguments the parser does not
know are handed on as ``args.rest`` (``serve``, ``models build``) instead of
being an error. ``args.parser`` is the subcommand's own parser, for usage
errors found after parsing (``args.parser.error(...)``: its usage, exit 2).
An OSError a command lets out (a path it was given that it cannot use) is
one line on stderr and exit status 1, never a traceback.
Modules import their heavy dependencies inside ``func`` so
``llmesh --help`` stays fast. To add a subcommand, add its module to
:data:`COMMANDS`; a listed module that does not exist yet is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import os
import importlib.util
import sys
from collections.abc import Sequence

#: Subcommand modules, in the order `llmesh --help` lists them.
COMMANDS = (
    "services.cli.launcher",   # up
    "services.cli.down",
    "services.cli.generate",
    "services.cli.status",
    "services.cli.certs",
    "services.cli.models",
    "services.cli.serve",
    "services.cli.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmesh", description="llmesh: LLM serving as gRPC microservices (router, target, draft, "
                                   "monitor, scaler).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        if importlib.util.find_spec(name) is not None:
            command = importlib.import_module(name).add_parser(subparsers)
            command.set_defaults(parser=command)  # usage errors found after parsing show the command's usage
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch loads OpenMP: with the default (spinning) wait policy, two
    # intra-op threads on a 2-core machine made every matrix product of two or
    # more rows take ~16 ms instead of ~0.2 ms. Services get the same policy
    # from the launcher, so in-process baselines (bench) run like them.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        args.parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # a file or directory the command needed (--home, a TLS file): one line, no traceback
        print(f"{args.parser.prog}: {describe_os_error(exc)}", file=sys.stderr, flush=True)
        return 1


def describe_os_error(exc: OSError) -> str:
    """``cannot use PATH: reason`` (the reason alone when the error names no path)."""
    reason = exc.strerror or str(exc)
    reason = reason[:1].lower() + reason[1:]
    paths = " or ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"cannot use {paths}: {reason}" if paths else reason


if __name__ == "__main__":
    sys.exit(main())
