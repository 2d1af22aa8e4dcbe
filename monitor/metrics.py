"""Throughput of an instance, a pool or the fleet over a window (pure).

Rates come from the cumulative ``*_total`` counters: the difference between
an instance's newest report and its report at the window start, divided by
the difference of the sender's timestamps. That is exact whatever window the
instance uses for its own rates. Gauges (queue, in flight) are the newest
report's; batch fill and utilisation are averaged over the reports in the
window; latency percentiles are the newest report's (they cover the
instance's own window, typically 10 s). Saturation is the fraction of the
window's reports in which the instance could take no more work (requests
queued, or the batch nearly full): the scaler measures an instance's
capacity as its tokens/s over windows it spent saturated.

Aggregates count the scope's *serving* instances: the targets, or the drafts
of a scope that holds no target. Drafts, the router and the others appear in
``per_instance`` but are left out of the sums, so that a request is not
counted once by the router, once by the target and again by the draft.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from monitor.store import COUNTERS, InstanceInfo, Report, Snapshot
from services.common.load import Latency, Role, UtilizationSource
from services.common.errors import InvalidArgument, NotFound

#: GetThroughput's largest window (monitor.proto); the store keeps reports a little longer.
MAX_WINDOW_S = 300.0
#: The windows every GetThroughput answer also covers, unless configured otherwise.
STANDARD_WINDOWS_S = (10.0, 60.0, 300.0)
#: A report whose batch holds at least this fraction of max_batch_size counts as saturated.
SATURATED_BATCH_FILL = 0.85


@dataclass(frozen=True)
class Scope:
    """One instance, one pool, or (both empty) the whole fleet."""

    instance_id: str = ""
    pool: str = ""

    def describe(self) -> str:
        if self.instance_id:
            return f"instance {self.instance_id}"
        return f"pool {self.pool}" if self.pool else "fleet"


@dataclass(frozen=True)
class Throughput:
    """llmesh.v1.ThroughputMetrics, plus figures the analysis needs that are not on the wire."""

    window_s: float = 0.0
    requests_per_second: float = 0.0
    tokens_per_second: float = 0.0
    batch_fill: float = 0.0
    accelerator_utilization: float = 0.0
    utilization_source: UtilizationSource = UtilizationSource.UNSPECIFIED
    in_flight: int = 0
    ttft: Latency = Latency()
    tpot: Latency = Latency()
    e2e: Latency = Latency()
    queue_time: Latency = Latency()
    acceptance_rate: float = 0.0
    error_rate: float = 0.0
    instances: int = 0
    queue_length: int = 0
    # -- not in ThroughputMetrics ------------------------------------------
    errors_per_second: float = 0.0
    rejected_per_second: float = 0.0
    proposed_per_second: float = 0.0
    kv_cache_usage: float = 0.0
    running: int = 0
    #: The newest reports' configured most running sequences (summed over a scope's instances).
    max_batch_size: int = 0
    saturation: float = 0.0
    queue_growth_per_second: float = 0.0


@dataclass(frozen=True)
class ThroughputResult:
    metrics: Throughput
    #: Every instance of the scope with a report in the window, serving or not.
    per_instance: dict[str, Throughput] = field(default_factory=dict)
    #: The keys behind ``metrics``.
    counted: tuple[str, ...] = ()


def resolve_window(window_s: float, default_s: float) -> float:
    """The window a request asks for: 0 means ``default_s``; at most MAX_WINDOW_S."""
    if window_s == 0:
        return default_s
    if not (math.isfinite(window_s) and 0 < window_s <= MAX_WINDOW_S):
        raise InvalidArgument("window_s", f"must be in (0, {MAX_WINDOW_S:g}] seconds (or 0 for the default), "
                                          f"got {window_s}")
    return window_s


def scope_keys(snapshot: Snapshot, scope: Scope) -> list[str]:
    """The keys of the instances a scope names; NotFound for an unknown instance or pool."""
    if scope.instance_id:
        key = snapshot.find(scope.instance_id)
        if key is None:
            raise NotFound(f"instance_id: no instance {scope.instance_id!r} is known to the monitor")
        return [key]
    if scope.pool:
        keys = [k for k, i in snapshot.instances.items() if i.pool == scope.pool]
        if not keys:
            raise NotFound(f"pool: no instance of pool {scope.pool!r} is known to the monitor")
        return sorted(keys)
    return sorted(snapshot.instances)


def serving_keys(infos: Iterable[InstanceInfo]) -> list[str]:
    """The instances whose work an aggregate counts: targets, else drafts."""
    infos = list(infos)
    for role in (Role.TARGET, Role.DRAFT):
        keys = [i.key for i in infos if i.role == role]
        if keys:
            return keys
    return []


def reports_as_registered(snapshot: Snapshot, key: str) -> bool:
    """Whether the instance's latest report says it is the role it was registered as (or says no
    role). A draft or a monitor registered as a target (the router shows it NOT_SERVING: "not a
    target") answers Stats/Watch as what it is: counted as a target it diluted the pool's saturation
    (0.333 with one real target saturated) and its instance count, which the scaler reads."""
    ring = snapshot.reports.get(key)
    info = snapshot.instances.get(key)
    if not ring or info is None:
        return True
    said = ring[-1].role
    return said == Role.UNSPECIFIED or said == info.role


def throughput(snapshot: Snapshot, window_s: float, scope: Scope, now: float) -> ThroughputResult:
    """Metrics of ``scope`` over ``[now - window_s, now]`` (monitor time)."""
    keys = scope_keys(snapshot, scope)
    windows = {k: w for k in keys
               if (w := _window(snapshot.reports.get(k, ()), window_s, now, snapshot.observed_since,
                                snapshot.first_seen.get(k))) is not None}
    per_instance = {k: _instance_metrics(w, window_s) for k, w in windows.items()}
    if scope.instance_id:
        counted = list(windows)
    else:
        counted = [k for k in serving_keys(snapshot.instances[k] for k in keys)
                   if k in windows and reports_as_registered(snapshot, k)]
    metrics = _aggregate([windows[k] for k in counted], [per_instance[k] for k in counted], window_s)
    return ThroughputResult(metrics, per_instance, tuple(counted))


def standard_windows(snapshot: Snapshot, windows_s: Sequence[float], scope: Scope, now: float) -> list[Throughput]:
    """The scope's aggregate metrics over each window, shortest first."""
    return [throughput(snapshot, w, scope, now).metrics for w in sorted(windows_s)]


def saturated(r: Report) -> bool:
    """The instance could take no more work when it sent ``r``: requests waited, or its batch was nearly full."""
    return r.queue_length > 0 or (r.max_batch_size > 0 and r.running >= SATURATED_BATCH_FILL * r.max_batch_size)


@dataclass(frozen=True)
class _Window:
    """One instance's reports in the window, reduced to rates and a newest report."""

    newest: Report
    in_window: tuple[Report, ...]
    #: Counter increments per second; None when the window holds a single report.
    rates: dict[str, float] | None
    #: Change of the queue length per second since the window start (0 with a single report).
    queue_growth: float = 0.0
    #: The share of the window its rates cover: 1, or less for an instance that appeared (started or
    #: restarted) inside the window while the monitor watched. Its rates are per second of its own
    #: life (what one instance serves); a sum over instances weighs each by its share.
    share: float = 1.0


#: An instance whose first report in the window came this long after the window (or the monitor's
#: watch) began appeared inside it; earlier, its first report is taken as the window's start.
APPEARED_AFTER_S = 2.0


def _window(ring: Sequence[Report], window_s: float, now: float, observed_since: float | None = None,
            first_seen: float | None = None) -> _Window | None:
    """None when the instance sent nothing in the window (it is stale or gone).
    ``observed_since``, ``first_seen``: monitor time of the store's first report and of this
    instance's (see :attr:`_Window.share`; a restarted instance was there all along)."""
    received = [r.received_at for r in ring]
    end = bisect.bisect_right(received, now)
    start = now - window_s
    if end == 0 or received[end - 1] <= start:
        return None
    newest = ring[end - 1]
    first_inside = bisect.bisect_right(received, start)
    # The report at the window start: the newest one at or before it, else the oldest kept.
    base = ring[first_inside - 1] if first_inside > 0 else ring[0]
    span = newest.timestamp - base.timestamp
    rates, growth, share = None, 0.0, 1.0
    if base is not newest and span > 0:
        rates = {c: (getattr(newest, c) - getattr(base, c)) / span for c in COUNTERS}
        growth = (newest.queue_length - base.queue_length) / span
        watched_from = start if observed_since is None else max(start, observed_since)
        appeared = base.received_at if first_seen is None else first_seen
        if first_inside == 0 and appeared - watched_from > APPEARED_AFTER_S:
            share = min(1.0, (newest.received_at - base.received_at) / max(1e-9, newest.received_at - watched_from))
    return _Window(newest, tuple(ring[first_inside:end]), rates, growth, share)


def _tiling(w: _Window) -> list[Report]:
    """The window's reports whose own latency windows tile it, newest first:
    the newest, then each newest one sent at least its successor's
    ``window_s`` before it. An instance's report summarises the latencies of
    its last ``window_s`` (10 s by default) and reports come every second, so
    overlapping ones would count a request many times, and the newest alone
    forgets what a longer window asked for."""
    picked = [w.newest]
    for r in reversed(w.in_window):
        if picked[-1].window_s <= 0:
            break  # a report that does not say what it covers: the newest alone, as before tiling
        if r.timestamp <= picked[-1].timestamp - picked[-1].window_s:
            picked.append(r)
    return picked


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _instance_metrics(w: _Window, window_s: float) -> Throughput:
    r, tiles = w.newest, _tiling(w)
    if w.rates is not None:
        requests, tokens = w.rates["requests_total"], w.rates["tokens_generated_total"]
        errors, rejected = w.rates["errors_total"], w.rates["rejected_total"]
        proposed, accepted = w.rates["proposed_tokens_total"], w.rates["accepted_tokens_total"]
        acceptance = accepted / proposed if proposed > 0 else 0.0
        error_rate = errors / requests if requests > 0 else 0.0
    else:
        # A single report (the instance just appeared): its own windowed rates are all there is.
        requests, tokens, errors, rejected, proposed = r.requests_per_second, r.tokens_per_second, 0.0, 0.0, 0.0
        acceptance, error_rate = r.acceptance_rate, 0.0
    return Throughput(
        window_s=window_s, requests_per_second=requests, tokens_per_second=tokens,
        batch_fill=_mean([x.batch_fill for x in w.in_window]),
        accelerator_utilization=_mean([x.accelerator_utilization for x in w.in_window]),
        utilization_source=r.utilization_source, in_flight=r.in_flight,
        # Latency over the window asked for, at the resolution of the instance's own window (a shorter one
        # gets the newest report's).
        ttft=merge_latency(t.ttft for t in tiles), tpot=merge_latency(t.tpot for t in tiles),
        e2e=merge_latency(t.e2e for t in tiles), queue_time=merge_latency(t.queue_time for t in tiles),
        acceptance_rate=acceptance, error_rate=error_rate, instances=1, queue_length=r.queue_length,
        errors_per_second=errors, rejected_per_second=rejected, proposed_per_second=proposed,
        kv_cache_usage=r.kv_cache_usage, running=r.running, max_batch_size=r.max_batch_size,
        saturation=_mean([1.0 if saturated(x) else 0.0 for x in w.in_window]),
        queue_growth_per_second=w.queue_growth,
    )


def merge_latency(summaries: Iterable[Latency]) -> Latency:
    """A conservative merge of per-instance summaries (percentiles cannot be merged exactly
    without the samples): p50 and mean are count-weighted means, p95 and p99 the maxima,
    so the fleet's tail is never reported better than its worst instance's."""
    parts = [s for s in summaries if s.count > 0]
    n = sum(s.count for s in parts)
    if not n:
        return Latency()
    return Latency(p50_ms=sum(s.p50_ms * s.count for s in parts) / n,
                   p95_ms=max(s.p95_ms for s in parts), p99_ms=max(s.p99_ms for s in parts),
                   mean_ms=sum(s.mean_ms * s.count for s in parts) / n, count=n)


def _aggregate(windows: list[_Window], parts: list[Throughput], window_s: float) -> Throughput:
    if not parts:
        return Throughput(window_s=window_s)
    # Sums of rates weigh each instance by the share of the window it was there (_Window.share).
    requests = sum(p.requests_per_second * w.share for p, w in zip(parts, windows))
    errors = sum(p.errors_per_second * w.share for p, w in zip(parts, windows))
    proposed = sum(p.proposed_per_second * w.share for p, w in zip(parts, windows))
    accepted = sum(w.rates["accepted_tokens_total"] * w.share for w in windows if w.rates is not None)
    batched = [p.batch_fill for p, w in zip(parts, windows) if w.newest.max_batch_size > 0]
    measured = [p for p in parts if p.utilization_source != UtilizationSource.UNSPECIFIED]
    sources = {p.utilization_source for p in measured}
    return Throughput(
        window_s=window_s, requests_per_second=requests,
        tokens_per_second=sum(p.tokens_per_second * w.share for p, w in zip(parts, windows)),
        batch_fill=_mean(batched),
        accelerator_utilization=_mean([p.accelerator_utilization for p in measured]),
        # One source when every instance measures the same way; a mix has no single name.
        utilization_source=sources.pop() if len(sources) == 1 else UtilizationSource.UNSPECIFIED,
        in_flight=sum(p.in_flight for p in parts),
        ttft=merge_latency(p.ttft for p in parts), tpot=merge_latency(p.tpot for p in parts),
        e2e=merge_latency(p.e2e for p in parts), queue_time=merge_latency(p.queue_time for p in parts),
        acceptance_rate=accepted / proposed if proposed > 0 else 0.0,
        error_rate=errors / requests if requests > 0 else 0.0,
        instances=len(parts), queue_length=sum(p.queue_length for p in parts),
        errors_per_second=errors,
        rejected_per_second=sum(p.rejected_per_second * w.share for p, w in zip(parts, windows)),
        proposed_per_second=proposed, kv_cache_usage=_mean([p.kv_cache_usage for p in parts]),
        running=sum(p.running for p in parts), max_batch_size=sum(p.max_batch_size for p in parts),
        saturation=_mean([p.saturation for p in parts]),
        queue_growth_per_second=sum(p.queue_growth_per_second for p in parts),
    )
