"""The parallel target as users run it: `llmesh up --tp 2 --pp 2` end to end, and its faults.

Greedy text through router -> target (4 ranks) -> draft equals TP=1's
(Hugging Face greedy on the same weights), speculation on and off. A worker
rank SIGKILLed mid-request fails that request with UNAVAILABLE and the
service exits non-zero, leaving no rank behind; the serving rank SIGKILLed
takes its workers with it. Real processes over Gloo: each group start costs
a few seconds per rank (tens on a busy machine).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from services.common.stubs import model_pb2_grpc, router_pb2_grpc
from tests.conftest import hf_greedy
from tests.e2e_helpers import PROMPT, Suite, alive, greedy, make_home, tokens_of, wait_until_routable

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
EXIT_TIMEOUT_S = 120  # bounded: the collective timeout below (20 s) plus process teardown on a busy machine


@pytest.fixture(scope="module")
def home(tiny_models, tmp_path_factory) -> Path:
    return make_home(tiny_models, tmp_path_factory, "llmesh-parallel-home")


@pytest.fixture(scope="module")
def suite(home):
    # A generous grace period: on a busy 2-core machine even a one-rank target takes 10-20 s to exit.
    suite = Suite.start(home, "--tp", "2", "--pp", "2", "--grace-period", "90")
    yield suite
    suite.cleanup()


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "speculative"])
def test_greedy_through_a_tp2_pp2_suite_equals_tp1(suite, reference_model, speculate):
    with grpc.insecure_channel(suite.addresses["router"]) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        wait_until_routable(router)
        routed = tokens_of(router, greedy(12, speculate=speculate))
    assert routed == hf_greedy(reference_model, PROMPT, 12)


def test_sigterm_stops_the_suite_and_every_rank(suite):
    ranks = children(suite.pids["target"])
    assert len(ranks) == 3  # ranks 1..3; rank 0 is the target process itself
    assert suite.terminate(timeout_s=150) == 0, "\n".join(suite.output[-40:])
    assert _wait_gone([*suite.pids.values(), *ranks], 10) == []


def _processes() -> list[tuple[int, str, int]]:
    """(pid, state, parent pid) of every process, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out.append((int(entry), fields[0], int(fields[1])))
    return out


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (any thread's)."""
    return [p for p, state, parent in _processes() if parent == pid and state != "Z"]


class Target:
    """`python -m services.target.main --tp 2` on a free port, its output read in the background."""

    def __init__(self, model: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.target.main", "--model", str(model), "--port", "0", "--threads", "1",
             "--tp", "2", "--parallel-timeout-s", "20", "--max-batch-size", "4", "--num-slots", "4"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        self.address = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._ready.wait(300), "the target never served:\n" + "\n".join(self.output[-40:])
        self.workers = children(self.proc.pid)
        assert len(self.workers) == 1, self.workers

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line.rstrip())
            if "serving on" in line:
                self.address = line.rsplit(" ", 1)[-1].strip()
                self._ready.set()
        self._ready.set()

    def cleanup(self) -> None:
        for pid in [self.proc.pid, *self.workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """The ``pids`` still running (zombies count as gone) after waiting up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = {p for p, state, _ in _processes() if state != "Z"}
        left = [p for p in pids if p in running]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)  # sleep-ok: bounded poll of other processes' exit


def test_a_worker_rank_killed_mid_request_fails_it_unavailable_and_the_service_exits(tiny_models):
    target = Target(tiny_models.target)
    try:
        with grpc.insecure_channel(target.address) as channel:
            stub = model_pb2_grpc.TargetModelStub(channel)
            assert len(tokens_of(stub, greedy(4, speculate=False))) == 4
            stream = stub.Generate(greedy(200, speculate=False), timeout=EXIT_TIMEOUT_S)
            next(stream)  # in flight
            os.kill(target.workers[0], signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert target.proc.wait(EXIT_TIMEOUT_S) != 0
        assert _wait_gone(target.workers, 10) == []
    finally:
        target.cleanup()


def test_the_serving_rank_killed_takes_its_worker_ranks_with_it(tiny_models):
    target = Target(tiny_models.target)
    try:
        os.kill(target.proc.pid, signal.SIGKILL)
        target.proc.wait()
        assert _wait_gone(target.workers, EXIT_TIMEOUT_S) == []
    finally:
        target.cleanup()
