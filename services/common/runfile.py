"""What a running `llmesh up` leaves behind so that `llmesh down` can find it.

`llmesh up` writes ``HOME/run/up-PORT.json`` (PORT: its router's port, so
suites on other ``--base-port`` values sharing one HOME keep apart) once its
services are spawned, and removes it after they have all stopped. The file
names the launcher's pid and each service's; `llmesh down` signals the
launcher, which stops the services as Ctrl-C would. A file whose launcher is
gone (killed with SIGKILL, the machine restarted) is stale: its services went
with the launcher (:mod:`services.common.lifeline`), and readers say so and
remove it.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.common.suite import MODULES

#: What every launcher's command line holds (`llmesh up` runs ``services.cli.main``, or the ``llmesh`` script).
_LAUNCHER_MARKS = ("llmesh", "services.cli")


@dataclass(frozen=True)
class UpRecord:
    """One running `llmesh up`."""

    #: The launcher's pid (the `llmesh up` process).
    pid: int
    host: str
    #: The router's port (``--base-port``).
    base_port: int
    #: Service name -> pid.
    services: dict[str, int] = field(default_factory=dict)
    #: ``time.time()`` when it was written (wall clock, seconds).
    started: float = 0.0
    #: The services' log directory.
    logs: str = ""

    @property
    def router(self) -> str:
        return f"{self.host}:{self.base_port}"


def run_dir(home: Path) -> Path:
    return home / "run"


def path_for(home: Path, base_port: int) -> Path:
    return run_dir(home) / f"up-{base_port}.json"


def write(home: Path, record: UpRecord) -> Path:
    """Writes ``record`` (atomically: a reader never sees half a file) and returns its path."""
    path = path_for(home, record.base_port)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**asdict(record), "started": record.started or time.time()}, indent=2) + "\n")
    tmp.replace(path)
    return path


def remove(home: Path, base_port: int, pid: int) -> None:
    """Removes the record of ``base_port`` if it is still the one launcher ``pid`` wrote."""
    path = path_for(home, base_port)
    record = _read(path)
    if record is not None and record.pid == pid:
        path.unlink(missing_ok=True)


def read_all(home: Path) -> list[tuple[Path, UpRecord]]:
    """Every readable record in ``home``, by port (unreadable files are skipped)."""
    out = []
    for path in sorted(run_dir(home).glob("up-*.json")):
        record = _read(path)
        if record is not None:
            out.append((path, record))
    return sorted(out, key=lambda pr: pr[1].base_port)


def _read(path: Path) -> UpRecord | None:
    try:
        data = json.loads(path.read_text())
        return UpRecord(pid=int(data["pid"]), host=str(data["host"]), base_port=int(data["base_port"]),
                        services={str(k): int(v) for k, v in dict(data.get("services", {})).items()},
                        started=float(data.get("started", 0.0)), logs=str(data.get("logs", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@functools.cache
def _boot_time() -> float | None:
    """When the machine booted (``time.time()`` clock, whole seconds), read once; None off Linux."""
    try:
        return next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _started_at(proc: Path) -> float | None:
    """When the process of ``/proc/PID`` started (``time.time()`` clock, seconds), or None."""
    boot = _boot_time()
    try:
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        return None if boot is None else boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: ticks
    except (OSError, ValueError, IndexError):
        return None


def launcher_alive(pid: int, written: float | None = None) -> bool:
    """Whether ``pid`` is a live (not zombie) process that looks like an llmesh
    launcher and, given when its record was ``written`` (``time.time()``),
    started before that: a pid reused by a later process is not the launcher.
    Where ``/proc`` is missing (not Linux), any live pid counts."""
    return _alive(pid, written, _LAUNCHER_MARKS)


def service_alive(pid: int, written: float | None = None) -> bool:
    """:func:`launcher_alive` for one of the services a launcher started (``python -m MODULE``)."""
    return _alive(pid, written, tuple(MODULES.values()))


def _alive(pid: int, written: float | None, marks: tuple[str, ...]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, not ours to judge
    proc = Path(f"/proc/{pid}")
    if not sys.platform.startswith("linux") or not proc.exists():
        return True
    try:
        state = next((line.split()[1] for line in (proc / "status").read_text().splitlines()
                      if line.startswith("State:")), "")
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False  # it exited while we looked
    if state == "Z" or not any(mark in cmdline for mark in marks):
        return False
    started = _started_at(proc) if written else None
    return started is None or started <= written + 1.0  # btime and ticks are whole: a second of slack


__all__ = ["UpRecord", "launcher_alive", "path_for", "read_all", "remove", "run_dir", "service_alive", "write"]
