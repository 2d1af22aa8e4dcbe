"""The engine's runner on rank 0, and the command loop of every other rank.

Rank 0's :class:`ParallelRunner` stands where the engine expects a
ModelRunner (``check``, ``forward``, ``timed_forward``, ``warmup``,
``cache``, ``max_len``, ``vocab_size``): each forward broadcasts the rows
(whatever a ForwardRow holds, pickled) to every rank, then runs its own
stage like the others. The scheduler, the KV-cache block bookkeeping and
sampling stay on rank 0 only (each row carries its block table); the other
ranks just run :func:`serve_commands`.

Faults: a collective that fails (a peer is gone, or does not answer within
the group's timeout) raises RunnerLost, which stops the engine: its
requests fail with UNAVAILABLE and the service exits non-zero. While idle,
a heartbeat (a broadcast and a barrier every ``heartbeat_s``) finds a rank
that died or hung between requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from services.engine.model_runner import ForwardRow, RunnerLost, timed
from services.parallel.stage import StageExecutor, StageStats

log = logging.getLogger(__name__)

FORWARD, PING, STATS, STOP = "forward", "ping", "stats", "stop"


def _broadcast(command: tuple) -> tuple:
    box = [command]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ParallelRunner:
    """Rank 0's runner over the whole group (the engine thread calls it; the
    heartbeat thread takes the same lock). ``micro_batches``: per step."""

    def __init__(self, executor: StageExecutor, micro_batches: int, heartbeat_s: float = 5.0) -> None:
        self.executor = executor
        local = executor.runner
        self.local = local
        self.cache = local.cache
        self.max_len = local.max_len
        self.vocab_size = local.vocab_size
        self.device = local.device
        self.dtype = local.dtype
        self.num_parameters = local.num_parameters
        self.prepacked = local.prepacked
        #: This rank's layout (each rank times packing for its own shard at load).
        self.weight_layout = local.weight_layout
        self.micro_batches = micro_batches
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._lost: RunnerLost | None = None
        self._closed = threading.Event()
        self._on_lost: Callable[[BaseException], None] | None = None

    # -- what the engine calls ------------------------------------------------------
    def check(self, row: ForwardRow) -> None:
        """As ModelRunner.check (every rank has the same limits)."""
        self.local.check(row)

    def forward(self, rows: list[ForwardRow]) -> list[torch.Tensor]:
        """Logits per row, computed by the whole group. RunnerLost when a rank
        is gone or hangs (the group is then unusable)."""
        if not rows:
            return []
        return self._collective(lambda: (_broadcast((FORWARD, rows, self.micro_batches)),
                                         self.executor.step(rows, self.micro_batches))[1])

    def timed_forward(self, rows: list[ForwardRow]) -> tuple[list[torch.Tensor], float]:
        """:meth:`forward` and its wall time in seconds, the broadcast included
        and rank 0's device synchronised, as ModelRunner.timed_forward (the
        speculation cost model's ``after_forward`` sees this time)."""
        return timed(self.forward, rows, self.device)

    def warmup(self) -> None:
        """A small prefill and decode through every rank (block 1: what it holds is overwritten before use)."""
        self.forward([ForwardRow([1], start=0, tokens=[0] * 4)])
        self.forward([ForwardRow([1], start=4, tokens=[0])])

    # -- group-wide ----------------------------------------------------------------------
    def stats(self) -> list[StageStats]:
        """Every rank's totals (gathered over the group), rank order."""
        def gather():
            _broadcast((STATS,))
            out = [None] * dist.get_world_size()
            dist.gather_object(self.executor.snapshot(), out, dst=0)
            return out
        return self._collective(gather)

    def ping(self) -> None:
        """One round trip through every rank (RunnerLost if one does not answer)."""
        self._collective(lambda: (_broadcast((PING,)), dist.barrier()))

    def start_heartbeat(self, on_lost: Callable[[BaseException], None]) -> None:
        """Pings every ``heartbeat_s`` while no step ran; ``on_lost(exc)`` (heartbeat
        thread) when the group is lost between steps."""
        self._on_lost = on_lost
        threading.Thread(target=self._beat, name="llmesh-parallel-heartbeat", daemon=True).start()

    def lost(self, exc: BaseException) -> None:
        """A rank is known gone (e.g. its process exited): fail now rather than at the next collective."""
        if self._lost is None and not self._closed.is_set():
            self._lost = RunnerLost(f"a parallel rank is gone: {exc}")
            log.error("%s", self._lost)
            if self._on_lost is not None:
                self._on_lost(self._lost)

    def close(self) -> None:
        """Tells the workers to exit (best effort, bounded) and leaves the group."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._lost is None and self._lock.acquire(timeout=5):
            try:
                _broadcast((STOP,))
                dist.destroy_process_group()  # this process may join another group later (benchmarks)
            except Exception:  # noqa: BLE001 - the workers are killed by the launcher anyway
                pass
            finally:
                self._lock.release()

    # -- internals -------------------------------------------------------------------------
    def _collective(self, fn):
        with self._lock:
            if self._lost is not None:
                raise self._lost
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - any failure leaves the group unusable
                self._lost = RunnerLost(f"a parallel rank failed or did not answer ({type(exc).__name__}: "
                                        f"{str(exc)[:200]})")
                raise self._lost from exc
            finally:
                self._last = time.monotonic()

    def _beat(self) -> None:
        while not self._closed.wait(self.heartbeat_s / 2):
            if self._lost is not None:
                return
            if time.monotonic() - self._last < self.heartbeat_s:
                continue
            try:
                self.ping()
            except RunnerLost as exc:
                if not self._closed.is_set() and self._on_lost is not None:
                    self._on_lost(exc)
                return


def serve_commands(executor: StageExecutor) -> None:
    """A worker rank's loop: runs what rank 0 broadcasts until STOP. Raises
    what torch.distributed raises when rank 0 or a peer is gone (timeout
    included): the worker process then exits non-zero."""
    while True:
        command = _broadcast((None,))
        kind = command[0]
        if kind == FORWARD:
            executor.step(command[1], command[2])
        elif kind == PING:
            dist.barrier()
        elif kind == STATS:
            dist.gather_object(executor.snapshot(), None, dst=0)
        elif kind == STOP:
            return
        else:
            raise RuntimeError(f"unknown command from rank 0: {kind!r}")
