"""`llmesh down`: stops a suite that `llmesh up` started, from another shell.

Reads the records `llmesh up` keeps in ``HOME/run`` (:mod:`services.common.runfile`),
sends each launcher SIGTERM (what Ctrl-C does: every service gets SIGTERM,
then SIGKILL after `up`'s grace period) and waits until the launcher has
removed its record, that is until its services have exited. With
``--base-port`` only that suite is stopped; without it, every suite recorded
in HOME. A record whose launcher is gone is stale: it is removed and said.

Exit status: 0 when every suite asked stopped (or none was running); 1 when
one was still running after ``--timeout``; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from services.cli import argtypes
from services.common.paths import default_home
from services.common.runfile import launcher_alive, read_all, run_dir

#: Seconds between looks at a stopping suite.
POLL_S = 0.2


def _say(text: str, error: bool = False) -> None:
    print(f"llmesh down: {text}", file=sys.stderr if error else sys.stdout, flush=True)


def run(args: argparse.Namespace) -> int:
    home = Path(args.home) if args.home else default_home()
    records = [(p, r) for p, r in read_all(home) if args.base_port is None or r.base_port == args.base_port]
    if not records:
        which = f" on port {args.base_port}" if args.base_port is not None else ""
        _say(f"no suite started by `llmesh up`{which} is recorded in {run_dir(home)}; nothing to stop")
        return 0
    stopping = []
    for path, record in records:
        if not launcher_alive(record.pid, record.started):
            path.unlink(missing_ok=True)
            _say(f"suite at {record.router}: its `llmesh up` (pid {record.pid}) is gone; removed its stale record "
                 f"(its services stop with it)")
            continue
        try:
            os.kill(record.pid, signal.SIGTERM)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            continue
        except PermissionError:
            _say(f"suite at {record.router}: not allowed to signal its `llmesh up` (pid {record.pid}); "
                 f"stop it as the user who started it", error=True)
            return 1
        _say(f"stopping the suite at {record.router} (`llmesh up` pid {record.pid}, "
             f"{len(record.services)} services)")
        stopping.append((path, record))
    deadline = time.monotonic() + args.timeout
    pending = list(stopping)
    while pending and time.monotonic() < deadline:
        time.sleep(POLL_S)
        for path, record in list(pending):
            if not path.exists() or not launcher_alive(record.pid, record.started):
                pending.remove((path, record))
                path.unlink(missing_ok=True)
                _say(f"stopped the suite at {record.router}")
    for _, record in pending:
        _say(f"the suite at {record.router} (`llmesh up` pid {record.pid}) was still stopping after "
             f"{args.timeout:g} s; its logs are in {home / 'logs'}", error=True)
    return 1 if pending else 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "down", help="stop a suite started by `llmesh up` (from another shell)",
        description="Stops what `llmesh up` started, as Ctrl-C on it would: every service gets SIGTERM, then "
                    "SIGKILL after up's grace period. Waits until they have exited.")
    p.add_argument("--home", help="llmesh home the suite runs from (default: $LLMESH_HOME or ~/.cache/llmesh)")
    p.add_argument("--base-port", type=argtypes.port,
                   help="stop only the suite whose router listens on this port (default: every suite in HOME)")
    p.add_argument("--timeout", type=argtypes.seconds, default=60.0,
                   help="seconds to wait for the services to exit (default: %(default)s)")
    p.set_defaults(func=run)
    return p
