"""Local service processes: start a suite's plan, wait for health, supervise, stop.

What `llmesh up`, the scaler's local backend and the benchmarks share. Each
process runs in its own session (a terminal's Ctrl-C reaches only the
launcher) and is bound to the launcher's life (:mod:`services.common.lifeline`).
Blocking calls; they run on the caller's thread and use ``time.monotonic()``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common import lifeline
from services.common.suite import ServiceSpec
from services.common.tls import Channels, TlsFiles

POLL_S = 0.2
TAIL_LINES = 25


class LaunchError(RuntimeError):
    """A service did not come up; the message names it and shows its log tail."""


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a log file ("" if there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def connect_address(spec: ServiceSpec) -> str:
    """Where a client on this machine reaches a service bound to ``spec.host``."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(spec.host, spec.host)
    return f"{host}:{spec.port}"


def busy_ports(host: str, ports: Sequence[int]) -> list[int]:
    """The ports that cannot be bound on ``host`` right now.

    Checked before anything starts, so that `llmesh up` names every busy
    port at once (each service would also refuse its own: llmesh servers
    turn gRPC's default SO_REUSEPORT off). A bind without SO_REUSEPORT fails
    on any port a server listens on, with or without it. The probe
    sets SO_REUSEADDR (as servers do), so connections of a suite that just
    stopped, left in TIME_WAIT for a minute, do not count as busy.
    """
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                busy.append(port)
    return busy


@dataclass
class Child:
    spec: ServiceSpec
    proc: subprocess.Popen
    log_path: Path
    #: Its exit has been dealt with by :func:`supervise` (reported; restarted or given up on).
    handled: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    def describe_exit(self) -> str:
        rc = self.proc.returncode
        how = f"was killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with code {rc}"
        text = tail(self.log_path)
        return f"{self.name} (pid {self.proc.pid}) {how}; last lines of {self.log_path}:\n{text}"


class ProcessGroup:
    """The processes of a plan: start them, wait for health, stop them."""

    def __init__(self, specs: Sequence[ServiceSpec], log_dir: Path, python: str = sys.executable,
                 base_env: dict[str, str] | None = None) -> None:
        self.specs = list(specs)
        self.log_dir = log_dir
        self.python = python
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.children: list[Child] = []

    def start(self) -> None:
        """Spawns every process, each in its own session (a terminal's Ctrl-C
        reaches only the launcher, which stops them in order) and bound to
        the launcher's life (see :mod:`services.common.lifeline`). A log left
        by an earlier run is kept as ``NAME.log.1`` (one generation), so a
        restart does not erase the evidence of a crash."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for spec in self.specs:
            self.children.append(self._spawn(spec))

    def restart(self, name: str) -> Child:
        """Starts the exited child ``name`` again, as :meth:`start` did (its
        last log kept as ``NAME.log.1``); returns the new child. OSError if
        it cannot be spawned."""
        index = next(i for i, c in enumerate(self.children) if c.name == name)
        self.children[index] = self._spawn(self.children[index].spec)
        return self.children[index]

    def _spawn(self, spec: ServiceSpec) -> Child:
        log_path = self.log_dir / f"{spec.name}.log"
        if log_path.exists() and log_path.stat().st_size:
            log_path.replace(log_path.with_name(log_path.name + ".1"))
        with open(log_path, "wb") as log:
            env = {**self.base_env, **spec.env, **lifeline.launcher_env()}
            proc = subprocess.Popen(spec.command(self.python), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return Child(spec, proc, log_path)

    def wait_ready(self, timeout_s: float, is_serving: Callable[[str], bool],
                   on_ready: Callable[[Child, float], None] = lambda child, waited: None,
                   stop: threading.Event | None = None) -> bool:
        """Waits until ``is_serving(address)`` holds for every child.

        Returns False if ``stop`` was set first. Raises :class:`LaunchError`
        when a child exits or the timeout passes.
        """
        stop = stop or threading.Event()
        started = time.monotonic()
        pending = list(self.children)
        while pending:
            for child in list(pending):
                if child.proc.poll() is not None:
                    raise LaunchError(f"{child.describe_exit()}\n{child.name} exited before it was ready")
                if is_serving(connect_address(child.spec)):
                    pending.remove(child)
                    on_ready(child, time.monotonic() - started)
            if not pending:
                return True
            if time.monotonic() - started > timeout_s:
                child = pending[0]
                raise LaunchError(f"{child.name} at {child.spec.address} (pid {child.proc.pid}) was not SERVING "
                                  f"after {timeout_s:.0f} s; last lines of {child.log_path}:\n{tail(child.log_path)}")
            if stop.wait(POLL_S):
                return False
        return True

    def exited(self) -> list[Child]:
        return [c for c in self.children if c.proc.poll() is not None]

    def stop(self, grace_s: float) -> dict[str, int]:
        """SIGTERM to every live child (last started first), SIGKILL to any
        still running after ``grace_s``; returns each child's exit code."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"llmesh up: {child.name} (pid {child.proc.pid}) ignored SIGTERM for {grace_s:.0f} s; "
                      "killing it", file=sys.stderr, flush=True)
                child.proc.kill()
                child.proc.wait()
        return {c.name: c.proc.returncode for c in self.children}


@dataclass(frozen=True)
class RestartPolicy:
    """When a supervised child that failed is started again (systemd's
    ``Restart=on-failure`` with a start limit; a child that exited with 0 or
    by SIGTERM was stopped, and is not): after ``backoff_s``, doubled for each
    earlier death within ``window_s`` (at most ``max_backoff_s``; with the
    defaults 1, 2, 4, 8 and 16 s); never after its ``max_restarts + 1``-th
    death within ``window_s`` (given up: a service that cannot stay up is
    reported, not looped). Seconds of ``time.monotonic()``."""

    max_restarts: int = 5
    window_s: float = 600.0
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def delay(self, deaths: Sequence[float], now: float) -> float | None:
        """Seconds to wait before the restart after the last of ``deaths`` (the
        times a child died, this death included); None: give up."""
        recent = sum(t > now - self.window_s for t in deaths)
        if recent > self.max_restarts:
            return None
        return min(self.max_backoff_s, self.backoff_s * 2 ** (recent - 1))


def supervise(fleet: "ProcessGroup", stop: threading.Event, keep_going: bool = False,
              restart: RestartPolicy | None = None, on_restart: Callable[[Child], None] = lambda child: None
              ) -> bool:
    """Blocks until ``stop`` is set or a child dies and is not restarted:
    without ``restart``, at its first death; with it, a child that failed is
    started again after the policy's backoff (``on_restart`` is told), until
    the policy gives up on it (one that exited with 0 or by SIGTERM is not
    restarted). With ``keep_going``, a child given up on leaves the others
    running: it blocks until ``stop`` or until every child is given up on.
    Reports each death on stderr. Returns True when no child died (one started
    again counts as a death)."""
    deaths: dict[str, list[float]] = {}
    due: dict[str, float] = {}  # name -> when it is started again
    given_up: set[str] = set()
    while not stop.wait(POLL_S):
        now = time.monotonic()
        for child in fleet.exited():
            if child.handled:
                continue
            child.handled = True
            deaths.setdefault(child.name, []).append(now)
            failed = child.proc.returncode not in (0, -signal.SIGTERM)
            delay = None if restart is None or not failed else restart.delay(deaths[child.name], now)
            if delay is not None:
                due[child.name] = now + delay
                then = f"starting it again in {delay:g} s"
            else:
                given_up.add(child.name)
                limit = ("" if restart is None else "it was stopped, not started again; " if not failed else
                         f"it died {len(deaths[child.name])} times within {restart.window_s:g} s; ")
                then = limit + ("the others keep running" if keep_going else "stopping the others")
            print(f"llmesh up: {child.describe_exit()}\nllmesh up: {then}", file=sys.stderr, flush=True)
        for name, at in list(due.items()):
            if now >= at:
                del due[name]
                try:
                    child = fleet.restart(name)
                except OSError as exc:
                    given_up.add(name)
                    print(f"llmesh up: could not start {name} again: {exc}", file=sys.stderr, flush=True)
                    continue
                print(f"llmesh up: {name} started again (pid {child.proc.pid})", file=sys.stderr, flush=True)
                on_restart(child)
        if given_up and (not keep_going or len(given_up) == len(fleet.children)):
            break
    return not deaths


def wait_routable(router: str, timeout_s: float = 60.0, tls: TlsFiles | None = None,
                  metadata: tuple[tuple[str, str], ...] = ()) -> None:
    """Waits until the router sees every registered instance as SERVING.
    ``tls``: the caller's certificate (None: plaintext); ``metadata``: sent
    with each ListInstances (the router's client or admin token)."""
    from services.common.stubs import router_pb2, router_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with Channels(tls).open_sync(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        while True:
            listed = stub.ListInstances(router_pb2.ListInstancesRequest(), timeout=5,
                                        metadata=metadata or None).instances
            if listed and all(i.health == router_pb2.INSTANCE_HEALTH_SERVING for i in listed):
                return
            if time.monotonic() > deadline:
                states = ", ".join(f"{i.spec.id}: {router_pb2.InstanceHealth.Name(i.health)}" for i in listed)
                raise TimeoutError(f"the router at {router} does not see its instances as healthy: {states}")
            time.sleep(0.1)


def is_serving(address: str, tls: TlsFiles | None = None) -> bool:
    """Whether ``address`` answers SERVING (over TLS with ``tls``)."""
    from services.common.healthcheck import check

    return check(address, timeout=1.0, tls=tls) == "SERVING"
