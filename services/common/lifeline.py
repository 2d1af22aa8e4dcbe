"""Ties a service's life to the launcher that started it.

A launcher (``llmesh up``, the scaler's local backend) puts its pid in
``LLMESH_PARENT_PID``. The service, once it runs, asks Linux to send it
SIGTERM when that parent dies (``PR_SET_PDEATHSIG``), so a killed launcher
leaves no orphans. This is done by the child itself, not by a ``preexec_fn``
in the parent: Python code between fork and exec in a process that has
torch and gRPC threads can crash the child before it ever runs (it did, one
start in three, under the scaler).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "LLMESH_PARENT_PID"
PR_SET_PDEATHSIG = 1


def launcher_env() -> dict[str, str]:
    """What a launcher adds to a child's environment."""
    return {PARENT_ENV: str(os.getpid())}


def bind_to_launcher(environ=os.environ) -> bool:
    """Arranges SIGTERM on the launcher's death; False if it is already gone.

    Without ``LLMESH_PARENT_PID`` (started by hand, by Docker or in a test)
    or off Linux, there is nothing to bind to and the answer is True.
    """
    wanted = environ.get(PARENT_ENV, "")
    if not wanted.isdigit() or not sys.platform.startswith("linux"):
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        return True  # the launcher's own stop path still reaches us
    # The parent may have died before the prctl: then we were re-parented.
    return os.getppid() == int(wanted)
