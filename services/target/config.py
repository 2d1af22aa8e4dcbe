"""The target-model service's configuration."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.config import ConfigError, field
from services.common.errors import InvalidArgument
from services.common.validation import check_address, check_gamma_range
from services.serving.model_service import ModelServiceConfig
from services.common.paths import default_model_path
from services.speculative.gamma import SpeculationSettings


class SpeculativeMethod(str, enum.Enum):
    """How the draft service proposes for requests that do not say."""

    DRAFT_MODEL = "draft_model"
    NGRAM = "ngram"


@dataclass
class TargetConfig(ModelServiceConfig):
    """llmesh target-model service: serves a causal LM with continuous batching."""

    SERVICE = "target"

    port: int = field(50061, "port to listen on (0: any free port)")
    draft_address: str = field("", "default draft instance (host:port) for speculative decoding")
    speculation_default: bool = field(False, "speculate for requests that do not say")
    gamma: int = field(4, "draft tokens proposed per round (starting value)")
    gamma_min: int = field(1, "lowest adaptive gamma")
    gamma_max: int = field(8, "highest adaptive gamma")
    draft_timeout_ms: float = field(500.0, "longest wait for a draft round before decoding without it")
    draft_hold_ms: float = field(50.0, "longest the whole batch waits for outstanding draft proposals (0: never)")
    speculative_disable_by_batch_size: int = field(
        0, "0: gamma (0 = off) chosen each step by the measured cost model; N > 0: a static override, no "
           "speculation while more than N sequences run or wait (vLLM's name)",
        deprecated=("speculation_max_batch",))
    speculative_method: SpeculativeMethod = field(
        SpeculativeMethod.DRAFT_MODEL, "how the draft proposes for requests that do not say: draft_model (its "
                                       "model) or ngram (n-gram lookup in the sequence, no model; vLLM's name)")
    speculation_min_acceptance: float = field(
        0.25, "a sequence below this acceptance falls back to ngram (a request that did not name its method) or "
              "stops speculating")
    tensor_parallel_size: int = field(1, "ranks each layer's heads and MLP are split over (Megatron-style)",
                                      aliases=("tp",))
    pipeline_parallel_size: int = field(1, "pipeline stages the layers are split over (by parameter count)",
                                        aliases=("pp",))
    micro_batches: int = field(0, "pipeline micro-batches per step (0: one per stage)")
    parallel_timeout_s: float = field(60.0, "timeout of the ranks' collectives: a rank silent this long fails "
                                            "the group")
    nnodes: int = field(1, "machines the ranks are spread over (torchrun's --nnodes)")
    node_rank: int = field(0, "this machine's index among them (torchrun's --node-rank; 0 serves gRPC)")
    master_addr: str = field("127.0.0.1", "address of node 0's rendezvous (torchrun's --master-addr)")
    master_port: int = field(0, "port of node 0's rendezvous (0: a free one; required with --nnodes > 1)")

    def parallel_spec(self):
        """The group's spec (services.parallel), or None for one rank."""
        if self.tensor_parallel_size * self.pipeline_parallel_size == 1 and self.nnodes == 1:
            return None
        from services.engine.build import resolve_device
        from services.parallel.group import ParallelSpec

        return ParallelSpec(model=self.model, tp=self.tensor_parallel_size, pp=self.pipeline_parallel_size,
                            micro_batches=self.micro_batches, timeout_s=self.parallel_timeout_s,
                            nnodes=self.nnodes, node_rank=self.node_rank, master_addr=self.master_addr,
                            master_port=self.master_port, device=resolve_device(self.device),
                            dtype=self.dtype, threads=self.threads, max_context=self.max_context,
                            block_size=self.block_size, kv_cache_memory=self.kv_cache_memory_bytes(),
                            num_kv_blocks=self.num_kv_blocks, prepack=self.prepack_weights)

    def speculation_settings(self) -> SpeculationSettings:
        return SpeculationSettings(draft_timeout_ms=self.draft_timeout_ms, draft_hold_ms=self.draft_hold_ms,
                                   disable_by_batch_size=self.speculative_disable_by_batch_size,
                                   min_acceptance=self.speculation_min_acceptance)

    def __post_init__(self) -> None:
        if not self.model:
            self.model = str(default_model_path("target"))

    def validate(self) -> None:
        super().validate()
        try:
            check_gamma_range(self.gamma_min, self.gamma, self.gamma_max)
            if self.draft_address:
                check_address("draft_address", self.draft_address)
        except InvalidArgument as exc:
            raise ConfigError(str(exc)) from None
        self.require(self.draft_timeout_ms > 0, "draft_timeout_ms", "must be > 0")
        self.require(self.draft_hold_ms >= 0, "draft_hold_ms", "must be >= 0 (0: never hold)")
        self.require(self.speculative_disable_by_batch_size >= 0, "speculative_disable_by_batch_size",
                     "must be >= 0 (0: the cost model decides)")
        self.require(0 <= self.speculation_min_acceptance <= 1, "speculation_min_acceptance", "must be in [0, 1]")
        self.require(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        self.require(self.pipeline_parallel_size >= 1, "pipeline_parallel_size", "must be >= 1")
        self.require(self.micro_batches >= 0, "micro_batches", "must be >= 0 (0: one per stage)")
        self.require(self.parallel_timeout_s > 0, "parallel_timeout_s", "must be > 0")
        self.require(self.nnodes >= 1, "nnodes", "must be >= 1")
        self.require(0 <= self.node_rank < self.nnodes, "node_rank", f"must be in [0, {self.nnodes})")
        self.require((self.tensor_parallel_size * self.pipeline_parallel_size) % self.nnodes == 0, "nnodes",
                     "must divide tensor_parallel_size * pipeline_parallel_size (ranks per node)")
        self.require(self.nnodes == 1 or self.master_port > 0, "master_port", "is required with --nnodes > 1")
        self.require(0 <= self.master_port <= 65535, "master_port", "must be a port (0: a free one)")
