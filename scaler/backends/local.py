"""The ``local`` backend: each instance is a ``python -m services.target.main`` process on a free port.

Processes are started the way ``llmesh up`` starts the suite (its
:class:`~services.common.processes.ProcessGroup`, one per instance): their own session,
their output in ``LOG_DIR/ID.log``, SIGTERM to them if the scaler dies, and
SIGTERM then SIGKILL after a grace period to stop them.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from scaler.backends import Backend, BackendError, LaunchSpec, Launched
from services.common.processes import ProcessGroup, connect_address
from services.common.suite import MODULES, ServiceSpec


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _threads(args: Sequence[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--threads" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return None


class LocalBackend(Backend):
    name = "local"

    def __init__(self, model: str | Path, log_dir: Path, *, host: str = "127.0.0.1", extra_args: str = "",
                 python: str = sys.executable, env: Mapping[str, str] | None = None,
                 module: str = MODULES["target"]) -> None:
        self.model = Path(model)
        self.log_dir = Path(log_dir)
        self.host = host
        self.extra_args = tuple(shlex.split(extra_args))
        self.python = python
        self.module = module
        threads = _threads(self.extra_args)
        self.env = {**(os.environ if env is None else env), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1",
                    **({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} if threads else {})}
        self._running: dict[int, ProcessGroup] = {}

    def command(self, spec: LaunchSpec, port: int) -> ServiceSpec:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", spec.instance_id)
        args = ("--model", str(self.model), "--host", self.host, "--port", str(port),
                "--instance-id", spec.instance_id, *self.extra_args)
        return ServiceSpec(name, self.module, port, args, host=self.host)

    async def start(self, spec: LaunchSpec) -> Launched:
        if not (self.model / "config.json").is_file():
            raise BackendError(f"no model at {self.model} (no config.json): give the scaler --target-model DIR")
        service = self.command(spec, free_port(self.host))
        fleet = ProcessGroup([service], self.log_dir, python=self.python, base_env=self.env)
        # Spawned from the event loop's thread, not a worker thread: the child
        # is sent SIGTERM when the thread that started it ends.
        try:
            fleet.start()
        except OSError as exc:
            raise BackendError(f"could not start {' '.join(service.command(self.python))}: {exc}") from None
        pid = fleet.children[0].proc.pid
        self._running[pid] = fleet
        return Launched(connect_address(service), f"pid {pid}, log {fleet.children[0].log_path}", fleet)

    async def stop(self, launched: Launched, grace_s: float) -> None:
        fleet: ProcessGroup = launched.handle
        await asyncio.to_thread(fleet.stop, grace_s)
        self._running.pop(fleet.children[0].proc.pid, None)

    def problem(self, launched: Launched) -> str | None:
        child = launched.handle.children[0]
        return None if child.proc.poll() is None else child.describe_exit()

    async def close(self, grace_s: float) -> None:
        fleets, self._running = list(self._running.values()), {}
        await asyncio.gather(*[asyncio.to_thread(f.stop, grace_s) for f in fleets])
