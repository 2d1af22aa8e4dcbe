"""The monitor's configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass

from monitor.analysis import Thresholds
from monitor.metrics import MAX_WINDOW_S, STANDARD_WINDOWS_S
from services.common.config import BaseConfig, field
from services.common.validation import valid_address


@dataclass
class MonitorConfig(BaseConfig):
    """llmesh monitor: throughput over sliding windows, bottleneck analysis, alerts, Prometheus export."""

    SERVICE = "monitor"

    port: int = field(50081, "port to listen on (0: any free port)")
    router: str = field("127.0.0.1:50051", "the router (host:port) whose instances are watched")
    watch_interval_s: float = field(1.0, "seconds between the load reports asked of each instance")
    list_interval_s: float = field(2.0, "seconds between Router.ListInstances calls (instances come and go)")
    rpc_timeout_s: float = field(5.0, "deadline of a ListInstances call")
    reconnect_initial_s: float = field(0.5, "first retry delay after a lost stream or a failed call")
    reconnect_max_s: float = field(10.0, "longest retry delay (the delay doubles, with jitter, up to this)")
    default_window_s: float = field(10.0, "window of GetThroughput/Analyze when the request says 0")
    windows_s: list[float] = field(list(STANDARD_WINDOWS_S), "windows every GetThroughput answer also covers "
                                   "(seconds, comma-separated)")
    target_requests_per_second: float = field(0.0, "finished requests/s each pool should reach; below it, with "
                                              "work waiting, Analyze recommends scaling out (0: no target)")
    high_ttft_ms: float = field(2000.0, "TTFT p95 above which a lightly used instance lacks prefill budget")
    analysis_interval_s: float = field(2.0, "seconds between evaluations of the alert rules")
    alert_for_s: float = field(5.0, "a condition must hold this long before its alert fires")
    alert_clear_s: float = field(10.0, "a firing alert clears after its condition has been gone this long")
    alert_startup_grace_s: float = field(60.0, "the fleet's start: a condition the monitor sees in its first "
                                         "seconds (models loading, the router not reached yet) counts toward "
                                         "alert_for_s only from this many seconds after the monitor's first "
                                         "evaluation")
    prometheus_port: int = field(9464, "HTTP port of the Prometheus exposition at /metrics (0: disabled)")

    def validate(self) -> None:
        super().validate()
        self.require(valid_address(self.router), "router", "must be host:port")
        for name in ("watch_interval_s", "list_interval_s", "rpc_timeout_s", "reconnect_initial_s",
                     "analysis_interval_s"):
            value = getattr(self, name)
            self.require(math.isfinite(value) and value > 0, name, "must be a finite number > 0")
        self.require(self.watch_interval_s >= 0.05, "watch_interval_s", "must be >= 0.05 (Stats.Watch's minimum)")
        self.require(self.reconnect_max_s >= self.reconnect_initial_s, "reconnect_max_s",
                     "must be >= reconnect_initial_s")
        self.require(0 < self.default_window_s <= MAX_WINDOW_S, "default_window_s",
                     f"must be in (0, {MAX_WINDOW_S:g}]")
        for name in ("alert_for_s", "alert_clear_s", "alert_startup_grace_s"):
            value = getattr(self, name)
            self.require(math.isfinite(value) and value >= 0, name, "must be a finite number >= 0")
        self.require(0 <= self.prometheus_port <= 65535, "prometheus_port", "must be in [0, 65535]")
        self.require(bool(self.windows_s) and all(0 < w <= MAX_WINDOW_S for w in self.windows_s), "windows_s",
                     f"must be one or more windows in (0, {MAX_WINDOW_S:g}]")
        self.require(math.isfinite(self.target_requests_per_second) and self.target_requests_per_second >= 0,
                     "target_requests_per_second", "must be a finite number >= 0")
        self.require(math.isfinite(self.high_ttft_ms) and self.high_ttft_ms > 0, "high_ttft_ms",
                     "must be a finite number > 0")

    def thresholds(self) -> Thresholds:
        return Thresholds(target_requests_per_second=self.target_requests_per_second, high_ttft_ms=self.high_ttft_ms)

    @property
    def retention_s(self) -> float:
        """How long reports are kept: the longest window plus a few reports' slack."""
        return MAX_WINDOW_S + max(10.0, 5 * self.watch_interval_s)
