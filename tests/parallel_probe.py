"""Rank 0 of a TP x PP group over a model directory, for tests/test_parallel.py.

``python tests/parallel_probe.py MODEL TP PP MICRO_BATCHES OUT``: runs
:data:`STEPS` through the group (workers started as child processes, as the
target does) and saves every forward's logits to OUT (torch.save), with the
group's per-rank statistics.
"""

from __future__ import annotations

import sys

import torch

from services.engine.model_runner import ForwardRow
from services.engine.settings import EngineSettings
from services.parallel.build import build_parallel_engine
from services.parallel.group import ParallelSpec

#: Prefill (two lengths), decode, verification rows (keep gamma+1) next to a
#: decode, and a mixed batch (a new prefill, a decode, a verification after a rollback).
STEPS = [
    [ForwardRow(0, 0, [5, 9, 11, 3, 7, 2, 8]), ForwardRow(3, 0, [4, 4, 6, 1])],
    [ForwardRow(0, 7, [12]), ForwardRow(3, 4, [13])],
    [ForwardRow(0, 8, [1, 2, 3, 4, 5], keep=5), ForwardRow(3, 5, [9])],
    [ForwardRow(5, 0, [7, 6, 5, 4, 3, 2]), ForwardRow(0, 10, [21]), ForwardRow(3, 6, [3, 2, 1], keep=3)],
]


def main(model: str, tp: int, pp: int, micro_batches: int, out: str) -> None:
    spec = ParallelSpec(model=model, tp=tp, pp=pp, micro_batches=micro_batches, timeout_s=60, num_slots=8,
                        threads=1)
    loaded = build_parallel_engine(spec, EngineSettings(num_slots=8, max_batch_size=8))
    runner = loaded.engine.runner
    try:
        logits = [runner.forward(rows) for rows in STEPS]
        stats = runner.stats()
    finally:
        loaded.close()
    torch.save({"logits": logits, "stats": [vars(s) for s in stats]}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
