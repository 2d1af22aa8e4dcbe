"""The router's configuration."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from router.tokenizer import tokenizer_file
from services.common.config import BaseConfig, ConfigError, field
from services.common.validation import valid_address


#: Largest HTTP request body read, in bytes (--http-max-body-bytes's default): a
#: prompt is at most 2 MiB of text, which JSON escaping can grow six-fold at
#: worst (\uXXXX per byte), and token ids take a few bytes each.
MAX_BODY_BYTES = 16 * 1024 * 1024


class PolicyName(enum.Enum):
    """How the router picks an instance among the healthy ones."""

    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    SCORE = "score"
    POWER_OF_TWO = "power_of_two"
    PREFIX_AFFINITY = "prefix_affinity"
    KV_AWARE = "kv_aware"


#: Priority classes as written in ``--pools`` (the Priority enum without its prefix).
PRIORITY_CLASSES = ("batch", "normal", "interactive")


@dataclass
class RouterConfig(BaseConfig):
    """llmesh router: the fleet registry and the front door for clients."""

    SERVICE = "router"

    port: int = field(50051, "port to listen on (0: any free port)")
    http_port: int = field(8000, "port of the OpenAI-compatible HTTP front door (/v1/completions, "
                                 "/v1/chat/completions, /v1/models, /health) on --host (0: none)")
    http_timeout_s: float = field(0.0, "seconds an HTTP request may take before it ends with 504 (0: no bound)")
    http_max_body_bytes: int = field(MAX_BODY_BYTES, "largest HTTP request body read, in bytes (larger: 413, "
                                                     "refused from its Content-Length or as it arrives)")
    http_allowed_origins: list[str] = field(["*"], "origins a browser page may call the HTTP front door from "
                                                   "(CORS), comma-separated; * for any (vLLM's default), "
                                                   "an empty value for none")
    targets: list[str] = field([], "target-model instances registered at start, comma-separated host:port or "
                                   "pool@host:port")
    drafts: list[str] = field([], "draft-model instances registered at start (host:port or pool@host:port)")
    pool: str = field("default", "pool of the --targets/--drafts given without one, and of every priority "
                                 "class --pools does not map")
    pools: list[str] = field([], "priority class -> pool, comma-separated class=pool "
                                 "(classes: batch, normal, interactive), e.g. interactive=fast,batch=bulk")
    spillover: list[str] = field([], "pools a priority class may spill over to when its own pool has no healthy "
                                     "instance or is full, comma-separated class->pool in order of preference, "
                                     "e.g. batch->default (none: a class stays in its pool)")
    policy: PolicyName = field(PolicyName.SCORE, "routing policy: score, round_robin, least_loaded, "
                                                 "power_of_two, prefix_affinity or kv_aware")
    weight_idle: float = field(0.3, "score: weight of an idle accelerator (1 - utilisation)")
    weight_queue: float = field(0.3, "score: weight of a short queue, 1 / (queue + 1)")
    weight_latency: float = field(0.2, "score: weight of a low time to first token, 0.1 / (ttft_s + 0.1)")
    weight_availability: float = field(0.2, "score: weight of availability, 1 / (1 + consecutive failures)")
    affinity_block: int = field(16, "prefix_affinity: prompt tokens per prefix block (text prompts: 4 characters "
                                    "per token)")
    affinity_max_imbalance: int = field(4, "prefix_affinity: a prefix stays on its instance while that one has at "
                                           "most this many requests more than the least loaded")
    affinity_table_size: int = field(65536, "prefix_affinity: most prefix blocks remembered (least recently "
                                            "used go first)")
    kv_load_weight: float = field(256.0, "kv_aware: cost of one request in flight on an instance, in prompt tokens "
                                         "to prefill (cost = tokens to prefill + tokens queued there unprefilled "
                                         "+ this x requests in flight)")
    kv_queue_weight: float = field(0.0, "kv_aware: weight of the prefill queued on an instance (prompt tokens "
                                        "routed there, not yet prefilled) in its cost; 0 (default) leaves it "
                                        "out: on the prefix benchmark it spread groups over instances")
    kv_events_interval_s: float = field(0.1, "kv_aware: how often targets send their KV-cache block events")
    tokenizer: str = field("", "kv_aware: the targets' tokenizer (a model directory or tokenizer.json), to hash "
                               "text prompts as the targets do; without it only token-id prompts get KV-aware "
                               "routing (text prompts go to the least loaded)")
    max_attempts: int = field(3, "most instances one request is sent to (first try, retries and resumes)")
    resume: bool = field(True, "resume a stream broken after its first token on another instance")
    max_in_flight: int = field(0, "requests in flight beyond which new ones get RESOURCE_EXHAUSTED (0: no bound)")
    pool_max_in_flight: int = field(0, "requests in flight per pool beyond which that pool takes no more "
                                       "(RESOURCE_EXHAUSTED unless a spillover pool can) (0: no bound)")
    pool_limits: list[str] = field([], "per-pool in-flight bounds overriding --pool-max-in-flight, "
                                       "comma-separated pool=N")
    cache_size: int = field(0, "response cache: most answers kept, least recently used go first (0: no cache)")
    cache_ttl_s: float = field(300.0, "response cache: seconds an answer stays valid")
    auth_token: str = field("", "clients must send `authorization: Bearer <token>` (empty: no authentication; "
                                "health, reflection and Stats stay open)")
    tls_client_auth: bool = field(False, "with TLS, require client certificates signed by --tls-ca (false: the "
                                         "router's port is public, clients need only trust the server; admin "
                                         "RPCs then need the admin token)")
    load_interval_s: float = field(0.5, "seconds between the load reports the router asks of each instance")
    health_interval_s: float = field(0.5, "seconds between Health/Check polls of instances whose Health/Watch fails")
    stale_after_s: float = field(2.0, "a load report older than this makes an instance's health unknown")
    reconnect_min_s: float = field(0.05, "first wait before re-subscribing to an instance that went away")
    reconnect_max_s: float = field(2.0, "longest wait between re-subscription attempts")
    eject_after_failures: int = field(5, "consecutive failed requests that eject an instance (0: never)")
    eject_for_s: float = field(10.0, "seconds an ejected instance stays out of rotation before a new try")
    metrics_window_s: float = field(10.0, "window of the rates and percentiles in the router's load reports")

    def __post_init__(self) -> None:
        # Values given in code (tests, the launcher) may be plain text, as flags are.
        if isinstance(self.policy, str):
            try:
                self.policy = PolicyName(self.policy.strip().lower())
            except ValueError:
                choices = ", ".join(p.value for p in PolicyName)
                raise ConfigError(f"policy: {self.policy!r} is not one of: {choices}") from None
        for name in ("targets", "drafts", "pools", "spillover", "pool_limits"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [a.strip() for a in getattr(self, name).split(",") if a.strip()])

    def validate(self) -> None:
        super().validate()
        for name in ("targets", "drafts"):
            for entry in getattr(self, name):
                pool, address = split_target(entry, self.pool)
                if not valid_address(address) or not pool:
                    raise ConfigError(f"{name}: {entry!r} is not host:port or pool@host:port")
        self.require(bool(self.pool), "pool", "must not be empty")
        self.priority_pools()
        self.spillover_map()
        self.pool_bounds()
        for name in ("weight_idle", "weight_queue", "weight_latency", "weight_availability"):
            self.require(getattr(self, name) >= 0, name, "must be >= 0")
        if not self.weight_idle + self.weight_queue + self.weight_latency + self.weight_availability > 0:
            raise ConfigError("weight_idle: the score's weights must not all be 0")
        self.require(self.affinity_block >= 1, "affinity_block", "must be >= 1")
        self.require(self.affinity_max_imbalance >= 0, "affinity_max_imbalance", "must be >= 0")
        self.require(self.affinity_table_size >= 1, "affinity_table_size", "must be >= 1")
        self.require(0 <= self.http_port <= 65535, "http_port", "must be in [0, 65535] (0: no HTTP front door)")
        self.require(self.http_timeout_s >= 0, "http_timeout_s", "must be >= 0 (0: no bound)")
        self.require(self.http_max_body_bytes >= 1024, "http_max_body_bytes", "must be >= 1024")
        self.require(self.kv_queue_weight >= 0, "kv_queue_weight", "must be >= 0 (a weight of prompt tokens)")
        self.require(self.kv_load_weight >= 0, "kv_load_weight", "must be >= 0 (prompt tokens per request in flight)")
        self.require(0.01 <= self.kv_events_interval_s <= 60, "kv_events_interval_s", "must be in [0.01, 60] seconds")
        if self.tokenizer:
            try:
                tokenizer_file(self.tokenizer)
            except FileNotFoundError as exc:
                raise ConfigError(f"tokenizer: {exc}") from None
        self.require(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        self.require(self.max_in_flight >= 0, "max_in_flight", "must be >= 0")
        self.require(self.pool_max_in_flight >= 0, "pool_max_in_flight", "must be >= 0")
        self.require(self.cache_size >= 0, "cache_size", "must be >= 0")
        self.require(self.cache_ttl_s > 0, "cache_ttl_s", "must be > 0")
        self.require(self.auth_token == self.auth_token.strip(), "auth_token", "must not start or end with spaces")
        self.require(self.load_interval_s >= 0.05, "load_interval_s", "must be >= 0.05")
        self.require(self.health_interval_s > 0, "health_interval_s", "must be > 0")
        self.require(self.stale_after_s > 0, "stale_after_s", "must be > 0")
        self.require(0 < self.reconnect_min_s <= self.reconnect_max_s, "reconnect_min_s",
                     "must be > 0 and <= reconnect_max_s")
        self.require(self.eject_after_failures >= 0, "eject_after_failures", "must be >= 0")
        self.require(self.eject_for_s >= 0, "eject_for_s", "must be >= 0")
        self.require(self.metrics_window_s > 0, "metrics_window_s", "must be > 0")

    # -- derived views (validated above) ------------------------------------
    def priority_pools(self) -> dict[str, str]:
        """Pool of each priority class (every class; unmapped ones get ``pool``)."""
        mapping = dict.fromkeys(PRIORITY_CLASSES, self.pool)
        for entry in self.pools:
            cls, sep, pool = (s.strip() for s in entry.partition("="))
            if not sep or cls.lower() not in PRIORITY_CLASSES or not pool:
                raise ConfigError(f"pools: {entry!r} is not class=pool with class one of "
                                  f"{', '.join(PRIORITY_CLASSES)}")
            mapping[cls.lower()] = pool
        return mapping

    def spillover_map(self) -> dict[str, tuple[str, ...]]:
        """Pools each priority class may spill over to, in order of preference
        (never its own pool)."""
        own = self.priority_pools()
        spill: dict[str, list[str]] = {}
        for entry in self.spillover:
            cls, sep, pool = (s.strip() for s in entry.partition("->"))
            if not sep or cls.lower() not in PRIORITY_CLASSES or not pool:
                raise ConfigError(f"spillover: {entry!r} is not class->pool with class one of "
                                  f"{', '.join(PRIORITY_CLASSES)}")
            cls = cls.lower()
            if pool == own[cls]:
                raise ConfigError(f"spillover: {entry!r} names the class's own pool")
            if pool not in spill.setdefault(cls, []):
                spill[cls].append(pool)
        return {cls: tuple(pools) for cls, pools in spill.items()}

    def pool_bounds(self) -> dict[str, int]:
        """In-flight bounds of the pools named in ``pool_limits``."""
        bounds = {}
        for entry in self.pool_limits:
            pool, sep, n = (s.strip() for s in entry.partition("="))
            if not sep or not pool or not n.isdigit():
                raise ConfigError(f"pool_limits: {entry!r} is not pool=N (N >= 0)")
            bounds[pool] = int(n)
        return bounds


def split_target(entry: str, default_pool: str) -> tuple[str, str]:
    """``pool@host:port`` -> (pool, address); a bare address gets ``default_pool``."""
    pool, sep, address = entry.partition("@")
    return (pool.strip(), address.strip()) if sep else (default_pool, entry.strip())


