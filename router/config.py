"""The router's configuration."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.config import BaseConfig, ConfigError, field


class PolicyName(enum.Enum):
    """How the router picks an instance among the healthy ones."""

    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    SCORE = "score"


@dataclass
class RouterConfig(BaseConfig):
    """llmesh router: the fleet registry and the front door for clients."""

    SERVICE = "router"

    port: int = field(50051, "port to listen on (0: any free port)")
    targets: list[str] = field([], "target-model instances (host:port, comma-separated) registered at start")
    drafts: list[str] = field([], "draft-model instances (host:port, comma-separated) registered at start")
    pool: str = field("default", "pool of the instances given by --targets/--drafts and of every request")
    policy: PolicyName = field(PolicyName.ROUND_ROBIN, "routing policy: round_robin, least_loaded or score")
    max_attempts: int = field(3, "most instances one request is sent to (first try, retries and resumes)")
    resume: bool = field(True, "resume a stream broken after its first token on another instance")
    max_in_flight: int = field(0, "requests in flight beyond which new ones get RESOURCE_EXHAUSTED (0: no bound)")
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
        for name in ("targets", "drafts"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [a.strip() for a in getattr(self, name).split(",") if a.strip()])

    def validate(self) -> None:
        super().validate()
        for name in ("targets", "drafts"):
            for address in getattr(self, name):
                if not valid_address(address):
                    raise ConfigError(f"{name}: {address!r} is not host:port")
        self.require(bool(self.pool), "pool", "must not be empty")
        self.require(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        self.require(self.max_in_flight >= 0, "max_in_flight", "must be >= 0")
        self.require(self.load_interval_s >= 0.05, "load_interval_s", "must be >= 0.05")
        self.require(self.health_interval_s > 0, "health_interval_s", "must be > 0")
        self.require(self.stale_after_s > 0, "stale_after_s", "must be > 0")
        self.require(0 < self.reconnect_min_s <= self.reconnect_max_s, "reconnect_min_s",
                     "must be > 0 and <= reconnect_max_s")
        self.require(self.eject_after_failures >= 0, "eject_after_failures", "must be >= 0")
        self.require(self.eject_for_s >= 0, "eject_for_s", "must be >= 0")
        self.require(self.metrics_window_s > 0, "metrics_window_s", "must be > 0")


def valid_address(address: str) -> bool:
    """``host:port`` with a numeric port (IPv6 hosts in brackets)."""
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) <= 65535)
