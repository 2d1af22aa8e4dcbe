"""The collectives a shard runs inside its forward, timed.

Megatron-LM's pattern (Shoeybi et al., 2019): after a row-parallel linear
one all-reduce sums the partial outputs of a tensor-parallel group; a
vocabulary-parallel embedding or LM head reduces or gathers over the same
group. Every call adds its wall time to :data:`TIMES` (seconds, this process),
which the step statistics report as communication.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CommTimes:
    """Seconds this process spent in collectives and point-to-point waits since start."""

    collective_s: float = 0.0
    recv_wait_s: float = 0.0
    send_wait_s: float = 0.0


TIMES = CommTimes()


def all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """Sums ``t`` over ``group`` in place (returns it)."""
    t0 = time.perf_counter()
    dist.all_reduce(t, group=group)
    TIMES.collective_s += time.perf_counter() - t0
    return t


def all_gather_last(t: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenates over ``group``, along the last dimension, each rank's ``t``
    whose last dimension is ``sizes[rank]`` (padded to the largest for the
    collective, which wants equal shapes)."""
    t0 = time.perf_counter()
    width = max(sizes)
    if t.shape[-1] < width:
        t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t.contiguous(), group=group)
    out = torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)
    TIMES.collective_s += time.perf_counter() - t0
    return out


def recv(t: torch.Tensor, src: int) -> torch.Tensor:
    """Receives into ``t`` from rank ``src``; the wait counts as pipeline bubble."""
    t0 = time.perf_counter()
    dist.recv(t, src=src)
    TIMES.recv_wait_s += time.perf_counter() - t0
    return t


def wait_sends(works: list) -> None:
    """Waits for isends issued during a step."""
    t0 = time.perf_counter()
    for w in works:
        w.wait()
    TIMES.send_wait_s += time.perf_counter() - t0
