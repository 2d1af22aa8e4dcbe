"""Builds the serving rank's engine over a TP x PP group (the target's parallel path)."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from transformers import AutoTokenizer

from services.engine.build import LoadedModel, check_model_dir, engine_for
from services.engine.settings import EngineSettings
from services.engine.speculation import Speculation
from services.parallel.group import ParallelSpec, join, load_shard
from services.parallel.launch import LocalRanks, free_port, under_torchrun
from services.parallel.runner import ParallelRunner
from services.parallel.stage import StageExecutor, reset_peak_rss

log = logging.getLogger(__name__)


def group_rank(spec: ParallelSpec, environ=os.environ) -> int:
    """This process's rank: torchrun's ``RANK``, else the node's first rank."""
    if under_torchrun(environ):
        return int(environ["RANK"])
    return spec.node_rank * spec.ranks_per_node


def with_rendezvous(spec: ParallelSpec, environ=os.environ) -> ParallelSpec:
    """The spec with torchrun's MASTER_ADDR/MASTER_PORT when it set them, and
    a free port on a single node when none is given."""
    if under_torchrun(environ):
        return replace(spec, master_addr=environ.get("MASTER_ADDR", spec.master_addr),
                       master_port=int(environ.get("MASTER_PORT", spec.master_port)),
                       nnodes=int(environ["WORLD_SIZE"]) // int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])))
    if spec.master_port == 0:
        if spec.nnodes > 1:
            raise ValueError("--master-port is required with --nnodes > 1")
        return replace(spec, master_port=free_port(spec.master_addr))
    return spec


def build_parallel_engine(spec: ParallelSpec, settings: EngineSettings, *, metrics_window_s: float = 10.0,
                          model_name: str = "", speculation: Speculation | None = None,
                          prefix_caching: bool = True) -> LoadedModel:
    """Starts the node's worker ranks, joins the group as rank 0, loads rank
    0's shard and wraps it in an engine (not started) whose runner drives the
    whole group (rank 0 keeps the KV-cache block bookkeeping, with automatic
    prefix caching when ``prefix_caching``). Blocking (seconds; until every rank joined, at most the
    spec's timeout). FileNotFoundError for no model, ValueError for sizes
    that do not divide it, RuntimeError when a rank does not join."""
    check_model_dir(spec.model)
    spec = with_rendezvous(spec)
    workers = None
    if not under_torchrun():
        workers = LocalRanks(spec, range(1, spec.ranks_per_node))
        workers.start()
    try:
        layout, tp_group = join(spec, 0)
        shard = load_shard(spec, layout, tp_group)
        reset_peak_rss()
        runner = ParallelRunner(StageExecutor(shard), spec.default_micro_batches,
                                heartbeat_s=max(1.0, min(5.0, spec.timeout_s / 4)))

        def close() -> None:
            log.info("stopping the parallel group")
            runner.close()
            if workers is not None:
                workers.stop()
            log.info("parallel group stopped")

        tokenizer = AutoTokenizer.from_pretrained(spec.model)
        loaded = engine_for(runner, shard.runner.model, tokenizer, spec.model, settings, device=spec.device,
                            dtype=spec.dtype, metrics_window_s=metrics_window_s, model_name=model_name,
                            speculation=speculation, prefix_caching=prefix_caching, close=close)
    except BaseException:
        if workers is not None:
            workers.stop(grace_s=0)
        raise
    runner.start_heartbeat(loaded.engine.fail)
    if workers is not None:
        workers.watch(runner.lost)
    log.info("parallel group: tp=%d pp=%d (%d ranks), %d micro-batches per step", spec.tp, spec.pp,
             spec.world_size, spec.default_micro_batches)
    return loaded
