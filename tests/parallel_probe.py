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

#: Block size and count of the cache: small blocks, so a row's table spans
#: several, not contiguous, interleaved with other sequences' blocks.
BLOCK_SIZE, NUM_BLOCKS = 4, 10
A, B, C = [2, 5, 7], [1, 4, 8], [3, 6]
D = [1, 9]  # a prompt whose first block is B's (a prefix-cache hit): only its suffix is fed

#: Prefill (two lengths; B's prompt logprobs asked: every position kept), decode,
#: verification rows (keep gamma+1) next to a decode, and a mixed batch (a new
#: prefill keeping every position, a decode, a verification after a rollback,
#: a prefill over a cached prefix block).
STEPS = [
    [ForwardRow(A, 0, [5, 9, 11, 3, 7, 2, 8]), ForwardRow(B, 0, [4, 4, 6, 1], keep=4)],
    [ForwardRow(A, 7, [12]), ForwardRow(B, 4, [13])],
    [ForwardRow(A, 8, [1, 2, 3, 4, 5], keep=5), ForwardRow(B, 5, [9])],
    [ForwardRow(C, 0, [7, 6, 5, 4, 3, 2], keep=6), ForwardRow(A, 10, [21]), ForwardRow(B, 6, [3, 2, 1], keep=3),
     ForwardRow(D, 4, [8, 8, 2])],
]


def main(model: str, tp: int, pp: int, micro_batches: int, out: str) -> None:
    spec = ParallelSpec(model=model, tp=tp, pp=pp, micro_batches=micro_batches, timeout_s=60, threads=1,
                        block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS)
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
