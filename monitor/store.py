"""The monitor's memory: who is out there, and a ring of recent load reports per instance.

Pure Python (no gRPC, no stubs): the subscriber writes plain dataclasses in, the
metrics and the analysis read an immutable :class:`Snapshot` out. The lock
exists because the Prometheus exporter scrapes from its HTTP thread while the
event loop writes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from services.common.load import LoadReport, Role


#: The cumulative counters of a report; a decrease of any of them means the instance restarted.
COUNTERS = ("requests_total", "tokens_generated_total", "errors_total", "rejected_total",
            "proposed_tokens_total", "accepted_tokens_total", "prefix_cache_queries_total",
            "prefix_cache_hits_total", "preemptions_total")


@dataclass(frozen=True, slots=True)
class Report(LoadReport):
    """One load report as the monitor keeps it: every field of the report, and when it arrived.

    ``timestamp`` is the sender's clock (consistent with its counters, so it
    is the denominator of rates); ``received_at`` is the monitor's clock
    (``time.time()`` seconds, so windows are placed on one clock whatever the
    senders' skew).
    """

    received_at: float = field(kw_only=True)


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """An instance the monitor watches. ``key`` is the router's registry id
    (the router itself is keyed by the id in its own reports)."""

    key: str
    address: str
    role: Role
    pool: str = ""
    #: Health SERVING and state ACTIVE in the router's registry.
    healthy: bool = True
    #: Came from Router.ListInstances (False for the router itself).
    listed: bool = True
    #: The router's state of the instance: "active", "draining" or "ejected".
    state: str = "active"
    #: Health SERVING as the router last saw it (whatever the state).
    serving: bool = True
    #: Consecutive failed requests the router saw on it.
    consecutive_failures: int = 0


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of the store at one moment."""

    instances: Mapping[str, InstanceInfo] = field(default_factory=dict)
    reports: Mapping[str, tuple[Report, ...]] = field(default_factory=dict)
    #: Monitor time of the last successful ListInstances; None if the router was never reached.
    listed_at: float | None = None
    #: Monitor time of the first report the store took (None: none yet): before it, nothing was seen.
    observed_since: float | None = None
    #: Monitor time of each instance's first report (kept across its restarts).
    first_seen: Mapping[str, float] = field(default_factory=dict)

    def find(self, name: str) -> str | None:
        """The key of an instance named by its registry id or by the id in its reports."""
        if name in self.instances:
            return name
        for key, ring in self.reports.items():
            if ring and ring[-1].instance_id == name:
                return key
        return None


class ReportStore:
    """Instances and their recent reports, trimmed to ``retention_s`` of monitor time."""

    def __init__(self, retention_s: float, max_reports: int = 10_000) -> None:
        self.retention_s = retention_s
        self.max_reports = max_reports
        self._lock = threading.Lock()
        self._instances: dict[str, InstanceInfo] = {}
        self._rings: dict[str, deque[Report]] = {}
        self._listed_at: float | None = None
        self._observed_since: float | None = None
        self._first_seen: dict[str, float] = {}

    def set_listed(self, infos: Iterable[InstanceInfo], now: float) -> tuple[list[str], list[str]]:
        """Replaces the router-listed instances; returns the keys (added, removed).

        Instances that are not listed (the router itself) are left alone.
        """
        new = {i.key: i for i in infos}
        with self._lock:
            old = {k for k, i in self._instances.items() if i.listed}
            removed = sorted(old - new.keys())
            added = sorted(new.keys() - old)
            for key in removed:
                self._drop(key)
            self._instances.update(new)
            self._listed_at = now
        return added, removed

    def upsert(self, info: InstanceInfo) -> None:
        with self._lock:
            self._instances[info.key] = info

    def remove(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: str) -> None:
        self._instances.pop(key, None)
        self._rings.pop(key, None)
        self._first_seen.pop(key, None)

    def add(self, key: str, report: Report) -> bool:
        """Appends a report; False (and nothing kept) when ``key`` is not a known instance.

        A counter that went down means the instance restarted: its older
        reports are dropped so that no rate ever spans the restart.
        """
        with self._lock:
            if key not in self._instances:
                return False
            ring = self._rings.setdefault(key, deque(maxlen=self.max_reports))
            if ring and any(getattr(report, c) < getattr(ring[-1], c) for c in COUNTERS):
                ring.clear()
            ring.append(report)
            if self._observed_since is None:
                self._observed_since = report.received_at
            self._first_seen.setdefault(key, report.received_at)
            horizon = report.received_at - self.retention_s
            while ring and ring[0].received_at < horizon:
                ring.popleft()
            return True

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(instances=MappingProxyType(dict(self._instances)),
                            reports=MappingProxyType({k: tuple(r) for k, r in self._rings.items()}),
                            listed_at=self._listed_at, observed_since=self._observed_since,
                            first_seen=MappingProxyType(dict(self._first_seen)))
