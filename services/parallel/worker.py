"""A worker rank: ``python -m services.parallel.worker RANK`` (spec in LLMESH_PARALLEL_SPEC).

Joins the group, loads its shard, runs what rank 0 broadcasts until told
to stop (status 0). Status 1 when rank 0 or a peer is gone or hangs past the
group's timeout, or when its parent exits.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from services.parallel.group import ParallelSpec, join, load_shard
from services.parallel.launch import PARENT_ENV, SPEC_ENV, LocalRanks, under_torchrun, watch_parent
from services.parallel.runner import serve_commands
from services.parallel.stage import StageExecutor, reset_peak_rss

log = logging.getLogger(__name__)


def run_worker(spec: ParallelSpec, rank: int) -> int:
    """Runs rank ``rank`` (not 0) to the end and exits the process (status 0
    when rank 0 said stop, 1 when the group failed). The
    first rank of a node other than the first starts its node's other ranks
    (unless torchrun did)."""
    siblings = None
    if rank % spec.ranks_per_node == 0 and not under_torchrun():
        siblings = LocalRanks(spec, range(rank + 1, rank + spec.ranks_per_node))
        siblings.start()
    try:
        layout, tp_group = join(spec, rank)
        executor = StageExecutor(load_shard(spec, layout, tp_group))
        reset_peak_rss()
        serve_commands(executor)
    except Exception as exc:  # noqa: BLE001 - rank 0 or a peer is gone: exit, don't linger
        log.error("rank %d stops: %s: %s", rank, type(exc).__name__, str(exc)[:300])
        os._exit(1)  # Gloo's teardown may block on a dead peer
    if siblings is not None:
        siblings.stop()
    logging.shutdown()
    os._exit(0)  # told to stop: nothing to save, and interpreter teardown with torch loaded takes seconds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{argv[0]} %(levelname)s %(name)s: %(message)s")
    if os.environ.get(PARENT_ENV, "").isdigit():
        watch_parent(int(os.environ[PARENT_ENV]))
    spec = ParallelSpec(**json.loads(os.environ[SPEC_ENV]))
    return run_worker(spec, int(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
