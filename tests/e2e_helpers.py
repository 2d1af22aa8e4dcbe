"""What the end-to-end tests share: a local suite started with `llmesh up` on
free ports, its home of tiny models, and small request helpers."""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.common.processes import busy_ports
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import router_pb2, stats_pb2
from services.common.suite import ports

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240
LINE = re.compile(r"^\s+(?P<name>\w+)\s+(?P<address>\S+:\d+)\s+pid (?P<pid>\d+)")
PROMPT = [5, 17, 42, 99, 3]


def free_base_port() -> int:
    """A base port whose suite ports (HTTP and Prometheus included) are all free right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000, 100)
        if not busy_ports("127.0.0.1", list(ports(base).values())):
            return base
    raise RuntimeError("no free port range")


@dataclass
class Suite:
    """A running `llmesh up` and what it printed."""

    proc: subprocess.Popen
    lines: queue.Queue = field(default_factory=queue.Queue)
    output: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, home: Path, *flags: str) -> "Suite":
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "up", "--home", str(home), "--threads", "1",
             "--base-port", str(free_base_port()), "--timeout", str(START_TIMEOUT_S), *flags],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        suite = cls(proc)
        threading.Thread(target=suite._read, daemon=True).start()
        suite.wait_for("llmesh up: ready", START_TIMEOUT_S + 30)
        return suite

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, text: str, timeout_s: float) -> str:
        """Reads output until a line containing ``text``; fails with the output if it never comes."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"no {text!r} from llmesh up:\n" + "\n".join(self.output))
            self.output.append(line)
            if m := LINE.match(line):
                self.pids[m["name"]] = int(m["pid"])
                self.addresses[m["name"]] = m["address"]
            if text in line:
                return line

    def terminate(self, timeout_s: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout_s)
        self.wait_for("llmesh up: stopped", 5)
        return rc

    def cleanup(self) -> None:
        """Kills whatever this suite started that is still alive (after a failed test)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def make_home(tiny_models, tmp_path_factory, name: str = "llmesh-home") -> Path:
    """An LLMESH_HOME whose models/target and models/draft are the tiny test models."""
    home = tmp_path_factory.mktemp(name)
    (home / "models").mkdir()
    (home / "models" / "target").symlink_to(tiny_models.target)
    (home / "models" / "draft").symlink_to(tiny_models.draft)
    return home


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def greedy(n: int = 12, speculate: bool | None = None) -> gen.GenerateRequest:
    speculation = gen.SpeculationParams() if speculate is None else gen.SpeculationParams(enabled=speculate)
    return gen.GenerateRequest(prompt=gen.Prompt(tokens=gen.TokenIds(ids=PROMPT)), speculation=speculation,
                               sampling=gen.SamplingParams(max_new_tokens=n, ignore_eos=True))


def tokens_of(stub, request, timeout: float = 60.0) -> list[int]:
    return [t for chunk in stub.Generate(request, timeout=timeout) for t in chunk.token_ids]


def wait_until_routable(router, timeout_s: float = 30.0) -> None:
    """Waits until the router sees its target as SERVING: the router serves
    at once and learns the health of its instances as they come up."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = router.ListInstances(router_pb2.ListInstancesRequest(role=stats_pb2.ROLE_TARGET), timeout=5)
        if any(i.health == router_pb2.INSTANCE_HEALTH_SERVING for i in reply.instances):
            return
        assert time.monotonic() < deadline, f"the router never saw a healthy target: {reply}"
        time.sleep(0.1)  # sleep-ok: bounded poll of another process's state
