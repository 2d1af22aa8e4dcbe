"""Starts this node's worker ranks as child processes and watches them.

Without torchrun, the serving process (rank 0) starts ranks 1..n-1 of its
node (``python -m services.parallel.worker``, the spec in
``LLMESH_PARALLEL_SPEC``); on another node (``--node-rank k``) the process
started there is that node's first rank and starts the rest. Each worker
exits when its parent does (it polls its parent pid: PR_SET_PDEATHSIG would
fire when the spawning *thread* ends, which is not the parent's death), and
the parent reports a worker's exit at once, before a collective times out.
Under torchrun, torchrun starts and reaps every rank and nothing here runs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from services.parallel.group import ParallelSpec

log = logging.getLogger(__name__)

SPEC_ENV = "LLMESH_PARALLEL_SPEC"
PARENT_ENV = "LLMESH_PARALLEL_PARENT"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def under_torchrun(environ=os.environ) -> bool:
    """torchrun (or a launcher following its conventions) set this process's rank."""
    return "RANK" in environ and "WORLD_SIZE" in environ


class LocalRanks:
    """Worker ranks ``ranks`` of ``spec``, as child processes of this one."""

    def __init__(self, spec: ParallelSpec, ranks: range) -> None:
        self.spec = spec
        self.ranks = ranks
        self.procs: dict[int, subprocess.Popen] = {}
        self._stopping = threading.Event()

    def start(self) -> None:
        env = {**os.environ, SPEC_ENV: json.dumps(self.spec.to_json()), PARENT_ENV: str(os.getpid())}
        env.pop("RANK", None)
        for rank in self.ranks:
            self.procs[rank] = subprocess.Popen([sys.executable, "-m", "services.parallel.worker", str(rank)],
                                                env=env, stdin=subprocess.DEVNULL)
        log.info("started worker ranks %s (pids %s)", list(self.ranks), [p.pid for p in self.procs.values()])

    def watch(self, on_exit: Callable[[BaseException], None], interval_s: float = 0.2) -> None:
        """Calls ``on_exit(exc)`` (watcher thread) when a worker exits before :meth:`stop`."""
        def loop() -> None:
            while not self._stopping.wait(interval_s):
                for rank, proc in self.procs.items():
                    code = proc.poll()
                    if code is not None and not self._stopping.is_set():
                        on_exit(RuntimeError(f"worker rank {rank} (pid {proc.pid}) exited with status {code}"))
                        return
        threading.Thread(target=loop, name="llmesh-parallel-watch", daemon=True).start()

    def stop(self, grace_s: float = 3.0) -> None:
        """Waits up to ``grace_s`` in all for the workers (told to stop), then kills those left."""
        self._stopping.set()
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def watch_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """Exits this process (status 1) as soon as ``parent_pid`` is no longer its parent."""
    def loop() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            threading.Event().wait(interval_s)
    threading.Thread(target=loop, name="llmesh-parent-watch", daemon=True).start()
