"""Services a scenario starts for itself: local processes on free ports."""

from __future__ import annotations

import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from services.common.healthcheck import check
from services.common.processes import ProcessGroup, wait_routable
from services.common.suite import ServiceSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def target_spec(model: Path, threads: int, draft: str = "", name: str = "target", **flags) -> ServiceSpec:
    port = free_port()
    args = ["--model", str(model), "--port", str(port), "--threads", str(threads), "--log-level", "warning"]
    if draft:
        args += ["--draft-address", draft]
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return ServiceSpec(name, "services.target.main", port, tuple(args), env=_env(threads))


def draft_spec(model: Path, threads: int, name: str = "draft") -> ServiceSpec:
    port = free_port()
    args = ["--model", str(model), "--port", str(port), "--threads", str(threads), "--log-level", "warning"]
    return ServiceSpec(name, "services.draft.main", port, tuple(args), env=_env(threads))


def router_spec(targets: list[str], drafts: list[str] = (), flags: tuple[str, ...] = ()) -> ServiceSpec:
    """The router over ``targets`` (and ``drafts``), with extra command-line ``flags``."""
    port = free_port()
    args = ["--port", str(port), "--http-port", "0", "--targets", ",".join(targets), "--log-level", "warning"]
    if drafts:
        args += ["--drafts", ",".join(drafts)]
    return ServiceSpec("router", "router.main", port, (*args, *flags), env=_env(1))


def _env(threads: int) -> dict[str, str]:
    return {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(max(1, threads))}


@contextmanager
def started(specs: list[ServiceSpec], log_dir: Path, timeout_s: float = 180.0):
    """Starts the processes, waits until each is SERVING (and the router, if
    any, sees them so), yields their ProcessGroup, stops them at the end.
    TimeoutError (from ProcessGroup.wait_ready) after ``timeout_s`` seconds."""
    group = ProcessGroup(specs, log_dir, python=sys.executable)
    group.start()
    try:
        group.wait_ready(timeout_s, lambda address: check(address) == "SERVING")
        router = next((spec.address for spec in specs if spec.name == "router"), None)
        if router is not None:
            wait_routable(router)
        yield group
    finally:
        group.stop(10.0)


@contextmanager
def running(specs: list[ServiceSpec], log_dir: Path, timeout_s: float = 180.0):
    """Like :func:`started`, but yields each service's address by name."""
    with started(specs, log_dir, timeout_s):
        yield {spec.name: spec.address for spec in specs}
