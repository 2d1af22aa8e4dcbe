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
from scaler.policy import HostLimit
from services.common.processes import ProcessGroup, connect_address
from services.common.suite import MODULES, ServiceSpec, flag_value


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _threads(args: Sequence[str]) -> str | None:
    return flag_value(args, "--threads")


def _positive(value: str | None) -> int:
    """``value`` as a positive int, else 0."""
    try:
        n = int(value or 0)
    except ValueError:
        return 0
    return max(n, 0)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_per_target(args: Sequence[str], env: Mapping[str, str], cores: int) -> int:
    """Torch threads one started target uses: ``--threads`` (per rank) or else the OMP_NUM_THREADS it
    inherits, times its ranks (``--tensor-parallel-size`` × ``--pipeline-parallel-size``); with
    neither, every core (torch's default, which its ranks share)."""
    tp, pp = (_positive(flag_value(args, f"--{name}-parallel-size")) or 1 for name in ("tensor", "pipeline"))
    ranks = tp * pp
    per_rank = _positive(_threads(args)) or _positive(env.get("OMP_NUM_THREADS"))
    return per_rank * ranks if per_rank else cores


class LocalBackend(Backend):
    name = "local"

    def __init__(self, model: str | Path, log_dir: Path, *, host: str = "127.0.0.1", extra_args: str = "",
                 python: str = sys.executable, env: Mapping[str, str] | None = None,
                 module: str = MODULES["target"], max_targets: int = 0, cores: int | None = None) -> None:
        """``max_targets``: the most targets at once (0: as many as the host's ``cores``, its CPU
        affinity by default, allow for the threads each target uses; at least 1)."""
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
        if max_targets > 0:
            self._limit = HostLimit(max_targets, f"the scaler's --max-local-targets {max_targets}")
        else:
            cores = cores or host_cores()
            per = threads_per_target(self.extra_args, self.env, cores)
            self._limit = HostLimit(max(1, cores // per),
                                    f"the host: {_count(cores, 'core')}, {_count(per, 'thread')} per target")

    def max_targets(self) -> HostLimit:
        """Processes on one host share its cores: past cores ÷ threads per target, another target
        divides the same cores instead of adding capacity."""
        return self._limit

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
