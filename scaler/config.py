"""The scaler's configuration."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from services.common.config import BaseConfig, ConfigError, field


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
    backend: Backend = field(Backend.LOCAL, "where instances run: local processes, docker, kubernetes")
    rpc_timeout_s: float = field(2.0, "deadline of a call to the router")
    default_min_instances: int = field(1, "min_instances of a pool that has no policy set")
    default_max_instances: int = field(8, "max_instances of a pool that has no policy set")
    history_limit: int = field(10_000, "scaling events kept (the oldest are forgotten first)")

    def validate(self) -> None:
        super().validate()
        self.require(bool(self.router.strip()), "router", "must be host:port")
        self.require(math.isfinite(self.rpc_timeout_s) and self.rpc_timeout_s > 0, "rpc_timeout_s",
                     "must be a finite number > 0")
        self.require(self.default_min_instances >= 0, "default_min_instances", "must be >= 0")
        if not 1 <= self.default_max_instances or self.default_max_instances < self.default_min_instances:
            raise ConfigError(f"default_max_instances: must be >= 1 and >= default_min_instances "
                              f"({self.default_min_instances}), got {self.default_max_instances}")
        self.require(self.history_limit >= 1, "history_limit", "must be >= 1")
