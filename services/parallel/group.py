"""One TP x PP group: its settings, the process group, and this rank's shard.

Every rank (the serving one and the workers alike) calls :func:`join` with
the same :class:`ParallelSpec`: torch.distributed over Gloo on CPU or NCCL
on CUDA, with a collective timeout, so a rank that dies or hangs fails the
others' next collective within ``timeout_s`` instead of blocking forever.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from services.engine.build import DEFAULT_KV_CACHE_MEMORY, kv_cache_blocks
from services.engine.model_runner import ModelRunner, bytes_per_token, configure_threads, load_model
from services.parallel.layout import Layout
from services.parallel.shard import check_divisible, shard_model, stage_layers

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ParallelSpec:
    """What every rank of one group is started with (JSON-able: it travels to workers)."""

    model: str
    tp: int = 1
    pp: int = 1
    micro_batches: int = 0         # 0: one per pipeline stage (pp)
    timeout_s: float = 60.0        # collective and point-to-point timeout
    start_timeout_s: float = 600.0  # longest wait for every rank to join
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0           # 0: a free port, chosen by the launching node (single node only)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0               # per rank; 0: the node's cores shared among its ranks
    max_context: int = 0
    block_size: int = 16           # tokens per KV-cache block
    kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY  # bytes of KV cache per rank
    num_kv_blocks: int = 0         # 0: as many as kv_cache_memory holds on the rank that holds the most per token
    prepack: bool = True

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def default_micro_batches(self) -> int:
        return self.micro_batches or self.pp

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Shard:
    """This rank's part: its layout, runner (its layers, heads and KV cache) and TP group."""

    layout: Layout
    runner: ModelRunner
    tp_group: object
    num_parameters: int     # of the whole model
    weight_bytes: int       # of this rank's shard
    hidden_size: int


def join(spec: ParallelSpec, rank: int) -> tuple[Layout, object]:
    """Joins the process group as ``rank``; returns the layout and this rank's
    TP group. Blocks until every rank joined (or ``start_timeout_s`` passes:
    DistStoreError, a RuntimeError)."""
    backend = "nccl" if spec.device.startswith("cuda") else "gloo"
    timeout = datetime.timedelta(seconds=spec.timeout_s)
    # Joining waits for the slowest rank's start-up (imports, on a busy machine, take tens of seconds):
    # the rendezvous store has its own, longer, timeout; collectives have the group's.
    store = dist.TCPStore(spec.master_addr, spec.master_port, spec.world_size, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=max(spec.timeout_s, spec.start_timeout_s)))
    dist.init_process_group(backend, store=store, rank=rank, world_size=spec.world_size, timeout=timeout)
    layout = Layout(spec.tp, spec.pp, rank)
    tp_group = None
    for stage in range(spec.pp):  # every rank creates every group, in the same order
        group = dist.new_group(layout.stage_ranks(stage), timeout=timeout)
        if stage == layout.stage:
            tp_group = group
    return layout, tp_group


def load_shard(spec: ParallelSpec, layout: Layout, tp_group) -> Shard:
    """Loads the model and cuts it to this rank's shard (the whole checkpoint
    is read, then all but the shard freed). The rank's paged KV cache holds
    only its layers and KV heads; every rank sizes the same number of blocks
    (block ids travel in the rows, the bookkeeping is rank 0's): those
    ``kv_cache_memory`` holds on the rank with the most layers. ValueError
    for sizes that do not divide the model, InvalidArgument for a cache
    that cannot hold one block."""
    local_ranks = spec.ranks_per_node
    cpus = os.cpu_count() or 1
    configure_threads(spec.threads or max(1, cpus // local_ranks))
    device = spec.device
    if device.startswith("cuda"):
        device = f"cuda:{layout.rank % local_ranks}"
        torch.cuda.set_device(device)
    model, _ = load_model(spec.model, DTYPES[spec.dtype], device)
    check_divisible(model.config, spec.tp)
    num_parameters = sum(p.numel() for p in model.parameters())
    hidden_size = model.config.hidden_size
    most_layers = max(len(r) for r in stage_layers(model, spec.pp))
    layers = shard_model(model, layout, tp_group)
    gc.collect()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # The config still counts every layer; its KV heads are the shard's now.
    token_bytes = bytes_per_token(model) * most_layers // model.config.num_hidden_layers
    blocks = kv_cache_blocks(spec.num_kv_blocks, spec.kv_cache_memory, spec.block_size, token_bytes)
    runner = ModelRunner(model, blocks, spec.block_size, spec.max_context or None, prepack=spec.prepack,
                         layers=layers)
    runner.num_parameters = num_parameters
    log.info("rank %d: stage %d (layers %d..%d), tp rank %d, %.1f MB of weights", layout.rank, layout.stage,
             layers.start, layers.stop - 1, layout.tp_rank, weight_bytes / 1e6)
    return Shard(layout, runner, tp_group, num_parameters, weight_bytes, hidden_size)
