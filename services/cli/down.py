"""`llmesh down`: stops a suite that `llmesh up` started, from another shell.

Reads the records `llmesh up` keeps in ``HOME/run`` (:mod:`services.common.runfile`),
sends each launcher SIGTERM (what Ctrl-C does: every service gets SIGTERM,
then SIGKILL after `up`'s grace period) and waits until the launcher has
removed its record, that is until its services have exited. With
``--base-port`` only that suite is stopped; without it, every suite recorded
in HOME. A record whose launcher is gone is stale: it is removed and said,
and its services (which stop when their launcher dies) are waited for.

Exit status: 0 when every suite asked stopped, or, without ``--base-port``,
when none was recorded; 1 when the ``--base-port`` suite is not recorded, or
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
from services.common.runfile import UpRecord, launcher_alive, read_all, run_dir, service_alive

#: Seconds between looks at a stopping suite.
POLL_S = 0.2


def _say(text: str, error: bool = False) -> None:
    print(f"llmesh down: {text}", file=sys.stderr if error else sys.stdout, flush=True)


def run(args: argparse.Namespace) -> int:
    home = Path(args.home) if args.home else default_home()
    everything = read_all(home)
    records = [(p, r) for p, r in everything if args.base_port is None or r.base_port == args.base_port]
    if not records and args.base_port is not None:  # the suite asked for is not there: say so, and fail
        running = ", ".join(r.router for _, r in everything) or "none"
        _say(f"no suite on port {args.base_port} is recorded in {run_dir(home)}; recorded: {running}"
             + (" (pass its --base-port, or none to stop every one)" if everything else ""), error=True)
        return 1
    if not records:
        _say(f"no suite started by `llmesh up` is recorded in {run_dir(home)}; nothing to stop")
        return 0
    # (path, record, pids of services left to wait for when the launcher is gone, None while it runs)
    pending: list[tuple[Path, UpRecord, list[int] | None]] = []
    for path, record in records:
        if not launcher_alive(record.pid, record.started):
            path.unlink(missing_ok=True)
            left = [pid for pid in record.services.values() if service_alive(pid, record.started)]
            _say(f"suite at {record.router}: its `llmesh up` (pid {record.pid}) is gone; removed its stale record"
                 + (f"; waiting for its {len(left)} services, which stop with it" if left else ""))
            if left:
                pending.append((path, record, left))
            continue
        try:
            os.kill(record.pid, signal.SIGTERM)
        except ProcessLookupError:
            pending.append((path, record, None))  # it exited on its own: the wait below says so
            continue
        except PermissionError:
            _say(f"suite at {record.router}: not allowed to signal its `llmesh up` (pid {record.pid}); "
                 f"stop it as the user who started it", error=True)
            return 1
        _say(f"stopping the suite at {record.router} (`llmesh up` pid {record.pid}, "
             f"{len(record.services)} services)")
        pending.append((path, record, None))
    deadline = time.monotonic() + args.timeout
    while pending:
        for entry in list(pending):
            path, record, left = entry
            if left is None:
                done = not path.exists() or not launcher_alive(record.pid, record.started)
            else:
                left[:] = [pid for pid in left if service_alive(pid, record.started)]
                done = not left
            if done:
                pending.remove(entry)
                path.unlink(missing_ok=True)
                _say(f"stopped the suite at {record.router}")
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    for _, record, left in pending:
        what = f"`llmesh up` pid {record.pid}" if left is None else "services pid " + ", ".join(map(str, left))
        _say(f"the suite at {record.router} ({what}) was still stopping after {args.timeout:g} s; "
             f"its logs are in {record.logs or home / 'logs'}", error=True)
    return 1 if pending else 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "down", help="stop a suite started by `llmesh up` (from another shell)",
        description="Stops what `llmesh up` started, as Ctrl-C on it would: every service gets SIGTERM, then "
                    "SIGKILL after up's grace period. Waits until they have exited. Exit status: 0 when every "
                    "suite asked stopped, or, without --base-port, when none is recorded; 1 when the --base-port "
                    "suite is not recorded or a suite was still stopping after --timeout.")
    p.add_argument("--home", help="llmesh home the suite runs from (default: $LLMESH_HOME or ~/.cache/llmesh)")
    p.add_argument("--base-port", type=argtypes.port,
                   help="stop only the suite whose router listens on this port (default: every suite in HOME)")
    p.add_argument("--timeout", type=argtypes.seconds, default=60.0,
                   help="seconds to wait for the services to exit (default: %(default)s)")
    p.set_defaults(func=run)
    return p
