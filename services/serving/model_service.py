"""Config and wire encodings shared by the two model services."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import BaseConfig, ConfigError, field
from services.common.errors import InvalidArgument
from services.common.stubs import model_pb2, stats_pb2
from services.engine.build import LoadedModel
from services.engine.engine import EngineLoad
from services.common.load import windowed
from services.common.load_codec import SOURCE_OF_PB, report_pb, role_of
from services.engine.kv_cache import parse_bytes
from services.engine.settings import EngineSettings


@dataclass
class ModelServiceConfig(BaseConfig):
    """Knobs every model service has."""

    model: str = field("", "model directory (any Hugging Face causal LM); default: the built default model")
    model_name: str = field("", "name reported in GetInfo (default: the directory name)")
    device: str = field("auto", "torch device: auto, cpu, cuda, cuda:N")
    dtype: str = field("float32", "weights and KV-cache dtype: float32, bfloat16, float16")
    threads: int = field(0, "torch intra-op threads for this process (0: torch's default)")
    prepack_weights: bool = field(True, "on CPU, pack linear weights once for oneDNN (2x faster multi-row products)")
    lean_forward: bool = field(True, "run Llama-family models through llmesh's lean forward (transformers' logits "
                                     "bit for bit, less Python per step); false: transformers' module tree")
    max_context: int = field(0, "most tokens per sequence (0: the model's max_position_embeddings)")
    max_batch_size: int = field(32, "most sequences in the running batch")
    max_wait_ms: float = field(2.0, "how long a new request may wait for companions before its prefill is forced")
    max_batch_tokens: int = field(2048, "token budget per engine step (prefill chunks counted)")
    max_queue: int = field(256, "waiting requests beyond which new ones get RESOURCE_EXHAUSTED")
    num_slots: int = field(64, "most sequences holding KV cache at once (running or paused)")
    block_size: int = field(16, "tokens per KV-cache block (paged KV cache)")
    kv_cache_memory: str = field("1GiB", "memory of the paged KV cache: bytes, or a size with a unit "
                                         "(512MiB, 2GiB, 1.5GB); --num-kv-blocks overrides it")
    num_kv_blocks: int = field(0, "KV-cache blocks (0: as many as --kv-cache-memory holds)")
    no_prefix_cache: bool = field(False, "turn automatic prefix caching off (a prompt's cached prefix is "
                                         "reused by default)")
    metrics_window_s: float = field(10.0, "window of the rates and percentiles in load reports")
    warmup: bool = field(True, "run a warm-up forward pass before reporting SERVING")
    metrics_port: int = field(-1, "HTTP port of this instance's Prometheus /metrics (vLLM's metric names, "
                                  "prefixed llmesh:) (0: any free port, -1: none)")

    def validate(self) -> None:
        super().validate()
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype: must be float32, bfloat16 or float16, got {self.dtype!r}")
        self.require(self.threads >= 0, "threads", "must be >= 0 (0: torch's default)")
        self.require(self.max_context >= 0, "max_context", "must be >= 0 (0: the model's own)")
        self.require(self.num_slots >= 1, "num_slots", "must be >= 1")
        self.require(1 <= self.block_size <= 1024, "block_size", "must be in [1, 1024] tokens")
        self.require(self.num_kv_blocks == 0 or self.num_kv_blocks >= 2, "num_kv_blocks",
                     "must be 0 (from --kv-cache-memory) or >= 2 (one is the null block)")
        try:
            self.require(self.kv_cache_memory_bytes() > 0, "kv_cache_memory", "must be more than 0 bytes")
        except ValueError as exc:
            raise ConfigError(f"kv_cache_memory: {exc}") from None
        self.require(self.metrics_window_s > 0, "metrics_window_s", "must be > 0")
        self.require(-1 <= self.metrics_port <= 65535, "metrics_port", "must be in [-1, 65535] (-1: none)")
        try:
            self.engine_settings().validate()
        except Exception as exc:  # InvalidArgument names the field
            raise ConfigError(str(exc)) from None

    def kv_cache_memory_bytes(self) -> int:
        """``kv_cache_memory`` in bytes; ValueError when it is not a size."""
        return parse_bytes(self.kv_cache_memory)

    def engine_settings(self) -> EngineSettings:
        return EngineSettings(max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms,
                              max_batch_tokens=self.max_batch_tokens, max_queue=self.max_queue,
                              num_slots=max(self.num_slots, self.max_batch_size))


def load_report(load: EngineLoad, instance_id: str, role: int, timestamp: float,
                utilization: tuple[float, int] | None = None) -> stats_pb2.LoadReport:
    """A LoadReport from the engine's published load (no engine state is read).
    ``role`` is a stats_pb2.Role value; ``timestamp`` wall-clock seconds since the
    epoch; ``utilization`` (fraction, stats_pb2.UtilizationSource value)
    overrides the engine's busy fraction (NVML on a GPU)."""
    m = load.metrics
    util, source = utilization or (m.busy_fraction, stats_pb2.UTILIZATION_SOURCE_ENGINE_BUSY)
    return report_pb(windowed(
        m, instance_id=instance_id, role=role_of(role), timestamp=timestamp,
        queue_length=load.queue_length, running=load.running, in_flight=load.queue_length + load.running,
        max_batch_size=load.max_batch_size,
        batch_fill=m.mean_batch_size / load.max_batch_size if load.max_batch_size else 0.0,
        accelerator_utilization=util, utilization_source=SOURCE_OF_PB[source],
        kv_cache_used_tokens=load.kv_used_tokens, kv_cache_capacity_tokens=load.kv_capacity_tokens,
        kv_cache_usage=load.kv_usage, prefix_cache_queries_total=load.prefix_cache_queries,
        prefix_cache_hits_total=load.prefix_cache_hits, preemptions_total=load.preemptions))


def settings_pb(settings: EngineSettings, **extra) -> model_pb2.EngineSettings:
    return model_pb2.EngineSettings(max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                                    max_batch_tokens=settings.max_batch_tokens, max_queue=settings.max_queue,
                                    **extra)


def model_info(loaded: LoadedModel, instance_id: str, role: int, settings: model_pb2.EngineSettings
               ) -> model_pb2.ModelInfo:
    engine = loaded.engine
    return model_pb2.ModelInfo(
        instance_id=instance_id, role=role, model_name=loaded.model_name, model_path=loaded.model_path,
        vocab_size=engine.vocab_size, max_context=engine.max_context, eos_token_ids=loaded.eos_token_ids,
        num_parameters=engine.runner.num_parameters, dtype=loaded.dtype, device=loaded.device,
        settings=settings, tokenizer_hash=loaded.tokenizer_hash,
        weight_layout=getattr(engine.runner, "weight_layout", ""))


#: The ConfigureRequest fields that are engine knobs (the rest are the target's speculation knobs).
ENGINE_FIELDS = ("max_batch_size", "max_wait_ms", "max_batch_tokens", "max_queue")
SPECULATION_FIELDS = ("speculation_default", "gamma", "gamma_min", "gamma_max", "draft_address")


def configure_changes(request: model_pb2.ConfigureRequest, speculates: bool = True) -> dict:
    """The engine knobs a ConfigureRequest sets (checked by the engine when
    applied). ``speculates``: False for a service without speculation knobs (the
    draft), which refuses them with InvalidArgument instead of ignoring them."""
    if not speculates:
        for name in SPECULATION_FIELDS:
            if request.HasField(name):
                raise InvalidArgument(name, "a draft does not speculate; set it on a target")
    return {name: getattr(request, name) for name in ENGINE_FIELDS if request.HasField(name)}
