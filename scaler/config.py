"""The scaler's configuration."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from services.common.config import BaseConfig, ConfigError, field
from services.common.validation import valid_address


class Backend(enum.Enum):
    """Where the scaler starts and stops instances."""

    LOCAL = "local"
    DOCKER = "docker"
    KUBERNETES = "kubernetes"


@dataclass
class ScalerConfig(BaseConfig):
    """llmesh scaler: desired instances per pool, warm-up, drain, scaling history."""

    SERVICE = "scaler"

    port: int = field(50091, "port to listen on (0: any free port)")
    router: str = field("127.0.0.1:50051", "the router (host:port) whose registry lists the pools")
    monitor: str = field("127.0.0.1:50081", "the monitor (host:port) whose metrics drive the policy")
    backend: Backend = field(Backend.LOCAL, "where instances run: local (processes on this machine), docker "
                                            "(containers of the suite's image), kubernetes (pods of each pool's "
                                            "Deployment)")
    rpc_timeout_s: float = field(2.0, "deadline of a call to the router or the monitor")
    interval_s: float = field(2.0, "seconds between two looks at the load (SetPolicy and ScaleTo act at once)")
    metrics_window_s: float = field(30.0, "the stable window: load and capacity are measured over it")
    panic_window_s: float = field(6.0, "the short window of panic mode")
    default_min_instances: int = field(1, "min_instances of a pool that has no policy set")
    default_max_instances: int = field(8, "max_instances of a pool that has no policy set")
    default_capacity_tokens_per_s: float = field(
        0.0, "tokens/s one instance is assumed to sustain until measured at saturation, for pools with no "
             "policy set (0: no estimate; a pool holds its size until an instance has been saturated)")
    default_scale_up_window_s: float = field(30.0, "scale_up_window_s of a pool that has no policy set")
    default_scale_down_window_s: float = field(300.0, "scale_down_window_s of a pool that has no policy set")
    history_limit: int = field(10_000, "scaling events kept (the oldest are forgotten first)")
    pools: list[str] = field([], "pools sized from the start, before the router lists any target of theirs "
                                 "(under Kubernetes: the pools of the target Deployments)")
    metrics_port: int = field(-1, "HTTP port of the Prometheus /metrics (instances per pool) (0: any free port, "
                                  "-1: none)")
    # -- the local backend --------------------------------------------------------
    target_model: str = field("", "model directory of the target instances the local backend starts "
                                  "(default: HOME/models/target)")
    target_args: str = field("", "more flags for those instances, as one string "
                                 "(e.g. '--threads 2 --max-batch-size 16')")
    instance_host: str = field("127.0.0.1", "address the started instances listen on and are registered at")
    log_dir: str = field("", "where started instances write their logs (default: HOME/logs/scaler)")
    max_local_targets: int = field(0, "the most targets on this machine at once, over every pool, whatever "
                                      "max_instances says (0: as many as its cores allow for the threads each "
                                      "target uses, at least 1: more would share the same cores, not add capacity)")
    # -- the docker backend (blanks: taken from the scaler's own container) ----------
    docker_image: str = field("", "image of the target containers (default: the scaler's own container's)")
    docker_network: str = field("", "network they join (default: the scaler's own container's first)")
    docker_volumes: str = field("", "named volumes they mount, 'VOLUME:/PATH[:ro|rw] ...' (default: the "
                                    "scaler's own container's named volumes, read-only)")
    docker_env: str = field("", "their environment besides the scaler's LLMESH_HOME, LLMESH_TLS_CA, "
                                "LLMESH_ADMIN_TOKEN_FILE, OMP_* and OTEL_*: 'NAME=VALUE ...'")
    docker_owner: str = field("", "value of their owner label, how a restarted scaler finds them "
                                  "(default: the scaler's compose project)")
    docker_domain: str = field("llmesh.internal", "they are reached at INSTANCE-ID.DOMAIN:50061, their network "
                                                  "alias (TLS certificates must name *.DOMAIN)")
    start_timeout_s: float = field(300.0, "longest wait for a started instance to report SERVING")
    warmup_tokens: int = field(4, "tokens of the warm-up generation before an instance is registered (0: none)")
    stop_grace_s: float = field(20.0, "seconds between SIGTERM and SIGKILL when an instance is stopped")
    retry_after_s: float = field(30.0, "after a failed start, seconds before the pool tries again")
    # -- the kubernetes backend -------------------------------------------------
    k8s_namespace: str = field("", "namespace of the target Deployments (default: the scaler pod's own)")
    k8s_cluster_domain: str = field("cluster.local", "the cluster's DNS domain, in the pods' addresses")

    def __post_init__(self) -> None:
        # Values given in code (tests, the bench) may be plain text, as flags are.
        if isinstance(self.backend, str):
            try:
                self.backend = Backend(self.backend.strip().lower())
            except ValueError:
                choices = ", ".join(b.value for b in Backend)
                raise ConfigError(f"backend: {self.backend!r} is not one of: {choices}") from None

    def validate(self) -> None:
        super().validate()
        self.require(valid_address(self.router), "router", "must be host:port")
        self.require(valid_address(self.monitor), "monitor", "must be host:port")
        for name in ("rpc_timeout_s", "interval_s", "metrics_window_s", "panic_window_s", "start_timeout_s",
                     "default_scale_up_window_s", "default_scale_down_window_s"):
            value = getattr(self, name)
            self.require(math.isfinite(value) and value > 0, name, "must be a finite number > 0")
        self.require(self.metrics_window_s <= 300 and self.panic_window_s <= self.metrics_window_s,
                     "panic_window_s", "must be <= metrics_window_s <= 300 (the monitor's longest window)")
        self.require(self.default_min_instances >= 0, "default_min_instances", "must be >= 0")
        if not 1 <= self.default_max_instances or self.default_max_instances < self.default_min_instances:
            raise ConfigError(f"default_max_instances: must be >= 1 and >= default_min_instances "
                              f"({self.default_min_instances}), got {self.default_max_instances}")
        self.require(math.isfinite(self.default_capacity_tokens_per_s) and self.default_capacity_tokens_per_s >= 0,
                     "default_capacity_tokens_per_s", "must be a finite number >= 0")
        self.require(self.history_limit >= 1, "history_limit", "must be >= 1")
        self.require(-1 <= self.metrics_port <= 65535, "metrics_port", "must be in [-1, 65535] (-1: none)")
        self.require(self.warmup_tokens >= 0, "warmup_tokens", "must be >= 0")
        self.require(self.max_local_targets >= 0, "max_local_targets", "must be >= 0 (0: from the host's cores)")
        for name in ("stop_grace_s", "retry_after_s"):
            value = getattr(self, name)
            self.require(math.isfinite(value) and value >= 0, name, "must be a finite number >= 0")
