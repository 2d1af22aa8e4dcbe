"""Bottleneck rules and alert hysteresis (pure: no gRPC, no stubs, no clock).

:func:`analyze` is a function of a store snapshot, a window, a scope and
``now``; each rule looks at the figures of :mod:`monitor.metrics` and says
what limits the system, what to change and what that should bring.
:class:`AlertTracker` turns successive analyses into alerts that fire after
a condition has held ``for_s`` and clear after it has been gone ``clear_s``
(the two delays are the hysteresis: a figure hovering at a threshold does
not make alerts flap).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from monitor.metrics import Scope, Throughput, ThroughputResult, scope_keys, serving_keys, throughput
from monitor.store import InstanceInfo, Snapshot
from services.common.load import Role


class Severity(enum.IntEnum):
    INFO = 1
    WARNING = 2
    CRITICAL = 3


@dataclass(frozen=True)
class Thresholds:
    #: Below this accelerator utilisation an instance with a queue is admission-bound.
    low_utilization: float = 0.5
    #: Below this batch fill an instance with a queue leaves batch slots unused.
    min_batch_fill: float = 0.7
    error_rate_warning: float = 0.05
    error_rate_critical: float = 0.25
    #: Below this acceptance rate speculation costs more than it brings.
    low_acceptance: float = 0.5
    #: Finished requests/s a pool should reach; 0: no target (only growing queues call for more instances).
    target_requests_per_second: float = 0.0
    #: A pool's queue counts as growing when it rose over the window and holds at least this many requests.
    growing_queue_min: int = 4
    #: Time to first token (p95) above which a lightly used instance lacks prefill budget.
    high_ttft_ms: float = 2000.0
    #: A pool saturated (queue or full batch) in at least this share of the window's reports, with at least
    #: growing_queue_min requests per instance waiting now, is at capacity even if its queue holds steady.
    saturated_share: float = 0.9


@dataclass(frozen=True)
class Recommendation:
    rule: str
    severity: Severity
    bottleneck: str
    action: str
    expected_effect: str
    #: The instance or pool concerned; empty for the fleet.
    subject: str
    #: The figure that crossed ``threshold`` (for alerts).
    value: float
    threshold: float
    evidence: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Analysis:
    result: ThroughputResult
    #: Most severe first.
    recommendations: list[Recommendation]


def analyze(snapshot: Snapshot, window_s: float, scope: Scope, now: float,
            thresholds: Thresholds = Thresholds()) -> Analysis:
    """Every rule over the scope's instances (and, for a pool or the fleet, its pools)."""
    result = throughput(snapshot, window_s, scope, now)
    infos = [snapshot.instances[k] for k in scope_keys(snapshot, scope)]
    recs = no_healthy_instances(infos, scope, snapshot.listed_at, now)
    dead_pools = {r.subject for r in recs}
    for info in sorted(infos, key=lambda i: i.key):
        if info.role in (Role.TARGET, Role.DRAFT) and info.pool not in dead_pools:
            rec = unhealthy_instance(info)
            if rec is not None:
                recs.append(rec)
    for key, m in sorted(result.per_instance.items()):
        if snapshot.instances[key].role in (Role.TARGET, Role.DRAFT):
            for rule in (low_utilization_with_queue, low_batch_fill, high_error_rate, low_acceptance_rate,
                         high_ttft_at_low_utilization):
                rec = rule(key, m, thresholds)
                if rec is not None:
                    recs.append(rec)
    if not scope.instance_id:
        pools = sorted({i.pool for i in infos if i.role in (Role.TARGET, Role.DRAFT)} - dead_pools)
        for pool in pools:
            rec = scale_out(pool, throughput(snapshot, window_s, Scope(pool=pool), now).metrics, thresholds)
            if rec is not None:
                recs.append(rec)
    recs.sort(key=lambda r: (-r.severity, r.rule, r.subject))
    return Analysis(result, recs)


def no_healthy_instances(infos: list[InstanceInfo], scope: Scope, listed_at: float | None,
                         now: float) -> list[Recommendation]:
    """CRITICAL per pool (and for an empty fleet) when no serving instance is healthy."""
    evidence_age = {"router_list_age_s": now - listed_at if listed_at is not None else -1.0}
    if scope.instance_id:
        groups = {i.key: [i] for i in infos if i.role in (Role.TARGET, Role.DRAFT)}
    else:
        pools = sorted({i.pool for i in infos if i.role in (Role.TARGET, Role.DRAFT)})
        groups = {p: [i for i in infos if i.pool == p] for p in pools}
        if not pools:
            where = "the router has not been reached yet" if listed_at is None else "the router lists none"
            return [Recommendation(
                "no_healthy_instances", Severity.CRITICAL, f"no model instance is known: {where}",
                "start a target instance and register it with the router (or check the router's address)",
                "requests can be served at all", scope.pool or scope.instance_id, 0.0, 1.0,
                {"instances": 0.0, "healthy": 0.0, **evidence_age})]
    recs = []
    for subject, group in groups.items():
        serving = [i for i in group if i.key in serving_keys(group)]
        healthy = sum(i.healthy for i in serving)
        if healthy == 0:
            recs.append(Recommendation(
                "no_healthy_instances", Severity.CRITICAL,
                f"none of the {len(serving)} {serving[0].role.value} instance(s) of {subject} is healthy",
                "check the instances' health and logs; start or register a healthy instance",
                f"requests to {subject} are served again", subject, 0.0, 1.0,
                {"instances": float(len(serving)), "healthy": 0.0, **evidence_age}))
    return recs


def unhealthy_instance(info: InstanceInfo) -> Recommendation | None:
    """The router ejected an instance after repeated failures, or sees an active one as not SERVING."""
    ejected = info.state == "ejected"
    if not ejected and (info.state != "active" or info.serving):
        return None
    why = (f"the router ejected {info.key} after {info.consecutive_failures} consecutive failed requests"
           if ejected else f"{info.key} is registered and active but its health is not SERVING")
    return Recommendation(
        "unhealthy_instance", Severity.WARNING, f"{why}: the pool serves with one instance less",
        f"read {info.key}'s log and restart it; Router.DeregisterInstance {info.key} if it cannot be fixed",
        f"pool {info.pool} has its full capacity again and no request is retried away from {info.key}",
        info.key, float(info.consecutive_failures), 0.0,
        {"ejected": float(ejected), "serving": float(info.serving),
         "consecutive_failures": float(info.consecutive_failures)})


def low_utilization_with_queue(key: str, m: Throughput, t: Thresholds) -> Recommendation | None:
    """Work waits while the accelerator idles: the host side (admission), not compute, is the limit."""
    if m.queue_length < 1 or m.accelerator_utilization >= t.low_utilization:
        return None
    kv_full = m.kv_cache_usage >= 0.9
    room = not kv_full and bool(m.max_batch_size) and m.running < m.max_batch_size
    if room and m.batch_fill < t.min_batch_fill:
        # The batch has room and runs part-empty: low_batch_fill says what holds the queue back (admission's
        # timing or token budget); "raise max_batch_size" here contradicted its "lower" (2026-12-02: both in
        # one answer, 8 of 32 running).
        return None
    action = ("raise kv_cache_memory (the paged KV cache's blocks are nearly all in use) on " if kv_full
              else "raise max_batch_tokens (the batch has room; the token budget per step keeps queued prefills "
                   "out) on " if room else "raise max_batch_size and max_batch_tokens on ") + key
    return Recommendation(
        "low_utilization_with_queue", Severity.WARNING,
        "host-side bottleneck: requests queue while the accelerator is idle; the batch bounds"
        + (" (the KV cache is full)" if kv_full else "") + " keep them out",
        action, "queued requests join the running batch: higher tokens/s, shorter queue time",
        key, m.accelerator_utilization, t.low_utilization,
        {"accelerator_utilization": m.accelerator_utilization, "queue_length": float(m.queue_length),
         "kv_cache_usage": m.kv_cache_usage, "batch_fill": m.batch_fill})


def low_batch_fill(key: str, m: Throughput, t: Thresholds) -> Recommendation | None:
    """The batch runs part-empty although requests wait. Not while it is full
    now: the window's mean fill counts the ramp up to it, and the advice would
    contradict low_utilization_with_queue's (raise max_batch_size)."""
    if m.queue_length < 1 or m.batch_fill >= t.min_batch_fill:
        return None
    if m.max_batch_size and m.running >= m.max_batch_size:
        return None
    return Recommendation(
        "low_batch_fill", Severity.WARNING,
        f"the batch is {m.batch_fill:.0%} full while {m.queue_length} request(s) wait: "
        "admission holds them back",
        f"on {key}: lower max_wait_ms (queued requests wait for companions that do not come), raise "
        "max_batch_tokens (so queued prefills fit in a step) or kv_cache_memory when the KV cache is full; "
        "if the batch never fills, lower max_batch_size to the batch it reaches",
        "fuller batches: more tokens per step at the same step time, shorter queue time",
        key, m.batch_fill, t.min_batch_fill,
        {"batch_fill": m.batch_fill, "queue_length": float(m.queue_length),
         "queue_time_p50_ms": m.queue_time.p50_ms, "kv_cache_usage": m.kv_cache_usage})


def high_error_rate(key: str, m: Throughput, t: Thresholds) -> Recommendation | None:
    if m.requests_per_second <= 0 or m.error_rate < t.error_rate_warning:
        return None
    critical = m.error_rate >= t.error_rate_critical
    return Recommendation(
        "high_error_rate", Severity.CRITICAL if critical else Severity.WARNING,
        f"{m.error_rate:.0%} of the requests finished by {key} failed: an unhealthy instance",
        f"read {key}'s log; drain it (Router.DrainInstance) if it keeps failing",
        "the router stops sending work to a failing instance",
        key, m.error_rate, t.error_rate_critical if critical else t.error_rate_warning,
        {"error_rate": m.error_rate, "errors_per_second": m.errors_per_second,
         "requests_per_second": m.requests_per_second})


def low_acceptance_rate(key: str, m: Throughput, t: Thresholds) -> Recommendation | None:
    if m.proposed_per_second <= 0 or m.acceptance_rate >= t.low_acceptance:
        return None
    return Recommendation(
        "low_acceptance_rate", Severity.INFO,
        f"only {m.acceptance_rate:.0%} of the draft's tokens are accepted on {key}",
        "lower gamma (or gamma_max), use a draft closer to the target, or turn speculation off for this load",
        "fewer wasted draft and verification tokens: lower per-token latency",
        key, m.acceptance_rate, t.low_acceptance,
        {"acceptance_rate": m.acceptance_rate, "proposed_per_second": m.proposed_per_second})


def high_ttft_at_low_utilization(key: str, m: Throughput, t: Thresholds) -> Recommendation | None:
    """Prompts wait long for their first token although the accelerator has room. What the advice
    is depends on what the TTFT is made of: mostly queue time behind a full batch, the batch is too
    small (2026-12-02: "raise max_batch_tokens" for a 4-of-4 batch whose queue time was 99 % of a
    4 s TTFT, for 6-token prompts); mostly queue time with room in the batch, admission's wait;
    else the per-step prefill budget spreads each prompt over many steps."""
    if m.ttft.count == 0 or m.ttft.p95_ms < t.high_ttft_ms or m.accelerator_utilization >= t.low_utilization:
        return None
    queued = m.queue_time.count > 0 and m.queue_time.p95_ms >= 0.5 * m.ttft.p95_ms
    full = bool(m.max_batch_size) and m.running >= m.max_batch_size
    if queued and full:
        why = f"requests wait for a place in a full batch ({m.running} of {m.max_batch_size} running)"
        action = (f"raise max_batch_size on {key} (the accelerator has room for more sequences per step), "
                  "or add instances")
        effect = "queued requests join the batch sooner: lower TTFT, using accelerator time that is idle now"
    elif queued:
        why = "requests wait in the queue although the batch has room"
        action = f"lower max_wait_ms on {key} (queued requests wait for companions); raise max_batch_tokens"
        effect = "queued requests are admitted sooner: lower TTFT"
    else:
        why = "the prefill budget per step is too small"
        action = f"raise max_batch_tokens on {key} (more prompt tokens per step)"
        effect = "prompts are prefilled in fewer steps: lower TTFT, using accelerator time that is idle now"
    return Recommendation(
        "high_ttft_at_low_utilization", Severity.WARNING,
        f"time to first token p95 is {m.ttft.p95_ms:.0f} ms (queue time p95 {m.queue_time.p95_ms:.0f} ms) while "
        f"the accelerator is {m.accelerator_utilization:.0%} busy: {why}",
        action, effect,
        key, m.ttft.p95_ms, t.high_ttft_ms,
        {"ttft_p95_ms": m.ttft.p95_ms, "ttft_p50_ms": m.ttft.p50_ms, "queue_time_p95_ms": m.queue_time.p95_ms,
         "accelerator_utilization": m.accelerator_utilization})


def scale_out(pool: str, m: Throughput, t: Thresholds) -> Recommendation | None:
    """A busy pool whose queues grow, that stays saturated with work waiting
    (a steady queue is a full pool too: 2026-12-02, 32 of 32 running and 8
    queued for 50 s had no advice), or that serves fewer requests/s than its
    target while work waits."""
    if m.instances == 0 or m.accelerator_utilization < t.low_utilization:
        return None  # nothing measured, or admission-bound (low_utilization_with_queue says what to change)
    growing = m.queue_growth_per_second > 0 and m.queue_length >= t.growing_queue_min
    # A short steady queue is a busy pool using what it has; growing_queue_min or more per instance is
    # requests waiting for capacity the pool does not have.
    saturated = m.saturation >= t.saturated_share and m.queue_length >= t.growing_queue_min * m.instances
    below = (t.target_requests_per_second > 0 and m.requests_per_second < t.target_requests_per_second
             and (m.queue_length > 0 or m.saturation >= 0.5))
    if not (growing or saturated or below):
        return None
    why = []
    if growing:
        why.append(f"queues grow by {m.queue_growth_per_second:.2f} request(s)/s ({m.queue_length} waiting)")
    elif saturated:
        waited = f" (queue time p50 {m.queue_time.p50_ms:.0f} ms)" if m.queue_time.count else ""
        why.append(f"saturated in {m.saturation:.0%} of the window with {m.queue_length} request(s) waiting{waited}")
    if below:
        why.append(f"{m.requests_per_second:.2f} requests/s is below the target of "
                   f"{t.target_requests_per_second:g}")
    more = max(1, math.ceil(m.instances * t.target_requests_per_second / m.requests_per_second) - m.instances) \
        if below and m.requests_per_second > 0 else 1
    return Recommendation(
        "scale_out", Severity.WARNING,
        f"pool {pool} is at capacity with {m.instances} instance(s), "
        f"{m.accelerator_utilization:.0%} utilised: " + "; ".join(why),
        f"add {more} instance(s) to pool {pool} (Scaler.ScaleTo, or raise its max_instances); where the scaler "
        "holds the pool at what its host's cores allow (GetStatus says 'capped at'), the capacity must come from "
        "another machine or fewer threads per target",
        "the queue drains and requests/s rises with the added capacity",
        pool, m.requests_per_second if below else (m.queue_growth_per_second if growing else m.saturation),
        t.target_requests_per_second if below else (0.0 if growing else t.saturated_share),
        {"requests_per_second": m.requests_per_second, "target_requests_per_second": t.target_requests_per_second,
         "queue_length": float(m.queue_length), "queue_growth_per_second": m.queue_growth_per_second,
         "accelerator_utilization": m.accelerator_utilization, "saturation": m.saturation,
         "instances": float(m.instances)})


# -- alerts -------------------------------------------------------------------

@dataclass(frozen=True)
class Alert:
    rule: str
    severity: Severity
    firing: bool
    subject: str
    value: float
    threshold: float
    message: str
    timestamp: float


@dataclass
class _Condition:
    since: float
    last_seen: float
    rec: Recommendation
    firing: bool = False


class AlertTracker:
    """Alerts from successive analyses, one per (rule, subject), with time hysteresis.

    ``startup_grace_s``: a fleet that is starting (models loading, the
    router not reached yet) is not a fleet that is down. A condition seen in
    the first ``startup_grace_s`` seconds after the first update counts as
    beginning at the end of that grace, so a normal start raises no alert and
    one that does not come up still does, ``for_s`` after the grace."""

    def __init__(self, for_s: float, clear_s: float, startup_grace_s: float = 0.0) -> None:
        self.for_s = for_s
        self.clear_s = clear_s
        self.startup_grace_s = startup_grace_s
        self._started_at: float | None = None
        self._conditions: dict[tuple[str, str], _Condition] = {}

    def update(self, recommendations: list[Recommendation], now: float) -> list[Alert]:
        """The alerts that fired or cleared at ``now``."""
        out: list[Alert] = []
        if self._started_at is None:
            self._started_at = now
        begins = max(now, self._started_at + self.startup_grace_s)
        present = {(r.rule, r.subject): r for r in recommendations}
        for key, rec in present.items():
            c = self._conditions.setdefault(key, _Condition(since=begins, last_seen=now, rec=rec))
            escalated = c.firing and rec.severity != c.rec.severity
            c.last_seen, c.rec = now, rec
            if (not c.firing and now - c.since >= self.for_s) or escalated:
                c.firing = True
                out.append(self._alert(c, True, now))
        for key in [k for k in self._conditions if k not in present]:
            c = self._conditions[key]
            if not c.firing:
                del self._conditions[key]  # pending, never fired: forget it
            elif now - c.last_seen >= self.clear_s:
                del self._conditions[key]
                out.append(self._alert(c, False, now))
        return out

    def firing(self) -> list[Alert]:
        return [self._alert(c, True, c.last_seen) for c in self._conditions.values() if c.firing]

    @staticmethod
    def _alert(c: _Condition, firing: bool, now: float) -> Alert:
        r = c.rec
        message = f"{r.bottleneck}; {r.action}" if firing else f"cleared: {r.bottleneck}"
        return Alert(r.rule, r.severity, firing, r.subject, r.value, r.threshold, message, now)
