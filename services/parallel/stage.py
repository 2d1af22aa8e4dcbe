"""One rank's part of a step: its pipeline stage over the step's micro-batches.

Every rank runs :meth:`StageExecutor.step` on the same rows (rank 0
broadcast them). The rows are cut into micro-batches (GPipe, Huang et al.,
2019, forward only): stage s receives micro-batch m's activations from stage
s-1, runs its layers and sends them on with a non-blocking send, so it works
on m+1 while stage s+1 works on m. The last stage's tp_rank 0 sends each
micro-batch's logits to rank 0. A stage's time waiting to receive is the
pipeline bubble; its ideal share is (pp-1)/(m+pp-1).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from services.engine.model_runner import ForwardRow
from services.parallel import comm
from services.parallel.group import Shard
from services.parallel.layout import split_micro_batches


@dataclass
class StageStats:
    """A rank's totals since start (seconds of wall time; bytes)."""

    rank: int
    stage: int
    tp_rank: int
    weight_bytes: int
    kv_cache_bytes: int = 0  # this rank's paged KV cache (its layers and KV heads)
    steps: int = 0
    step_s: float = 0.0
    collective_s: float = 0.0
    recv_wait_s: float = 0.0
    send_wait_s: float = 0.0
    peak_rss_bytes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def compute_s(self) -> float:
        return max(0.0, self.step_s - self.collective_s - self.recv_wait_s - self.send_wait_s)


class StageExecutor:
    """Runs this rank's stage of a step (every rank; the thread that owns the runner)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.runner = shard.runner
        self.layout = shard.layout
        kv_bytes = sum(t.numel() * t.element_size() for pair in self.runner.cache.layers for t in pair)
        self.stats = StageStats(shard.layout.rank, shard.layout.stage, shard.layout.tp_rank, shard.weight_bytes,
                                kv_bytes)

    @torch.inference_mode()
    def step(self, rows: list[ForwardRow], micro_batches: int) -> list[torch.Tensor] | None:
        """Logits (rank 0: float32 ``[keep, vocab]`` per row) or None (other
        ranks). Raises what torch.distributed raises when a peer is gone or
        does not answer within the group's timeout."""
        t0 = time.perf_counter()
        lay, runner = self.layout, self.runner
        parts = [rows[r.start:r.stop] for r in split_micro_batches(len(rows), micro_batches)]
        out: list[torch.Tensor] = []
        sends = []
        for part in parts:
            ctx = runner.prepare(part)
            if lay.first_stage:
                hidden = runner.embed(ctx)
            else:
                shape = (*ctx.ids.shape, self.shard.hidden_size)
                hidden = comm.recv(torch.empty(shape, dtype=runner.dtype, device=runner.device), lay.prev_rank)
            hidden = runner.run_layers(hidden, ctx)
            if not lay.last_stage:
                sends.append(dist.isend(hidden.contiguous(), lay.next_rank))
                continue
            logits = runner.head(hidden, ctx)
            if lay.rank == 0:
                out.extend(logits)
            elif lay.rank == lay.logits_rank:
                sends.append(dist.isend(torch.cat(logits).contiguous(), 0))
        comm.wait_sends(sends)
        if lay.rank == 0 and not lay.last_stage:
            for part in parts:
                keeps = [r.keep for r in part]
                buf = torch.empty(sum(keeps), runner.vocab_size, dtype=torch.float32, device=runner.device)
                out.extend(comm.recv(buf, lay.logits_rank).split(keeps))
        self.stats.steps += 1
        self.stats.step_s += time.perf_counter() - t0
        return out if lay.rank == 0 else None

    def snapshot(self) -> StageStats:
        """The totals so far, with the communication times and peak RSS read now."""
        s = self.stats
        s.collective_s, s.recv_wait_s, s.send_wait_s = (comm.TIMES.collective_s, comm.TIMES.recv_wait_s,
                                                        comm.TIMES.send_wait_s)
        s.peak_rss_bytes = peak_rss_bytes()
        return s


def peak_rss_bytes() -> int:
    """This process's peak resident memory since :func:`reset_peak_rss` (or start)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Starts the peak anew (Linux: clear_refs 5), e.g. once the full checkpoint read at load is freed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
