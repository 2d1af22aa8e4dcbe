"""The monitor's pure parts: the store, throughput over windows, the rules, alert hysteresis."""

from __future__ import annotations

import math

import pytest

from monitor.analysis import AlertTracker, Severity, analyze
from monitor.metrics import Scope, merge_latency, resolve_window, throughput
from monitor.store import InstanceInfo, Report, ReportStore
from services.common.load import Latency, Role, UtilizationSource
from services.common.errors import InvalidArgument, NotFound

T0 = 1_000_000.0


def report(key: str, t: float, *, role: Role = Role.TARGET, tokens_per_s: float = 0.0,
           requests_per_s: float = 0.0, skew: float = 0.0, **kw) -> Report:
    """A report at monitor time ``t`` whose counters grew at the given rates since T0."""
    elapsed = t - T0
    kw.setdefault("tokens_generated_total", int(tokens_per_s * elapsed))
    kw.setdefault("requests_total", int(requests_per_s * elapsed))
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("utilization_source", UtilizationSource.ENGINE_BUSY)
    return Report(instance_id=key, role=role, timestamp=t + skew, received_at=t, **kw)


def store_with(*infos: InstanceInfo) -> ReportStore:
    store = ReportStore(retention_s=330)
    store.set_listed([i for i in infos if i.listed], now=T0)
    for i in infos:
        if not i.listed:
            store.upsert(i)
    return store


def target(key: str, pool: str = "default", healthy: bool = True) -> InstanceInfo:
    return InstanceInfo(key, f"{key}:1", Role.TARGET, pool, healthy)


def feed(store: ReportStore, key: str, seconds: float, every: float = 0.5, **kw) -> float:
    t = T0
    while t <= T0 + seconds + 1e-9:
        store.add(key, report(key, t, **kw))
        t += every
    return t - every


def test_rates_come_from_counters_over_the_window():
    store = store_with(target("a"))
    now = feed(store, "a", 30, tokens_per_s=200, requests_per_s=4, in_flight=3, queue_length=1)
    m = throughput(store.snapshot(), 10, Scope(), now).metrics
    assert m.tokens_per_second == pytest.approx(200, rel=1e-3)
    assert m.requests_per_second == pytest.approx(4, rel=1e-3)
    assert m.in_flight == 3 and m.queue_length == 1 and m.instances == 1
    assert m.window_s == 10


def test_a_rate_change_shows_only_in_windows_that_cover_it():
    store = store_with(target("a"))
    for i in range(41):  # 100 tok/s for 20 s, then idle for 20 s
        t = T0 + i * 1.0
        store.add("a", report("a", t, tokens_generated_total=100 * min(i, 20)))
    now = T0 + 40
    assert throughput(store.snapshot(), 10, Scope(), now).metrics.tokens_per_second == 0
    assert throughput(store.snapshot(), 30, Scope(), now).metrics.tokens_per_second == pytest.approx(1000 / 30)


def test_rates_use_the_senders_clock_so_skew_does_not_matter():
    store = store_with(target("a"))
    now = feed(store, "a", 20, tokens_per_s=50, skew=-3600.0)
    assert throughput(store.snapshot(), 10, Scope(), now).metrics.tokens_per_second == pytest.approx(50, rel=1e-3)


def test_a_single_report_falls_back_to_the_instances_own_rates():
    store = store_with(target("a"))
    store.add("a", report("a", T0, tokens_per_second=42.0, requests_per_second=2.0))
    m = throughput(store.snapshot(), 10, Scope(), T0 + 1).metrics
    assert m.tokens_per_second == 42.0 and m.requests_per_second == 2.0


def test_a_restart_does_not_make_negative_rates():
    store = store_with(target("a"))
    for i, total in enumerate([1000, 1100, 1200, 10, 60, 110]):
        store.add("a", report("a", T0 + i, tokens_generated_total=total))
    m = throughput(store.snapshot(), 10, Scope(), T0 + 5).metrics
    assert m.tokens_per_second == pytest.approx(50)


def test_scope_by_instance_and_pool():
    store = store_with(target("a", "fast"), target("b", "fast"), target("c", "slow"),
                       InstanceInfo("d", "d:1", Role.DRAFT, "fast"))
    now = feed(store, "a", 12, tokens_per_s=100)
    feed(store, "b", 12, tokens_per_s=50)
    feed(store, "c", 12, tokens_per_s=10)
    feed(store, "d", 12, role=Role.DRAFT, tokens_per_s=400)
    snap = store.snapshot()
    fleet = throughput(snap, 10, Scope(), now)
    assert fleet.metrics.tokens_per_second == pytest.approx(160, rel=1e-3)  # targets only
    assert set(fleet.per_instance) == {"a", "b", "c", "d"}
    fast = throughput(snap, 10, Scope(pool="fast"), now)
    assert fast.metrics.tokens_per_second == pytest.approx(150, rel=1e-3)
    assert fast.metrics.instances == 2 and set(fast.per_instance) == {"a", "b", "d"}
    one = throughput(snap, 10, Scope(instance_id="b"), now)
    assert one.metrics.tokens_per_second == pytest.approx(50, rel=1e-3) and one.metrics.instances == 1
    # An instance scope counts any role: the draft's own figures.
    assert throughput(snap, 10, Scope(instance_id="d"), now).metrics.tokens_per_second == pytest.approx(400, 1e-3)


def test_an_instance_can_be_named_by_the_id_in_its_reports():
    store = store_with(target("10.0.0.1:50061"))
    store.add("10.0.0.1:50061", Report("target@host", Role.TARGET, T0, received_at=T0))
    assert throughput(store.snapshot(), 10, Scope(instance_id="target@host"), T0).metrics.instances == 1


def test_unknown_scope_is_not_found_and_an_empty_store_is_all_zero():
    store = ReportStore(retention_s=330)
    m = throughput(store.snapshot(), 10, Scope(), T0).metrics
    assert (m.tokens_per_second, m.requests_per_second, m.instances, m.in_flight) == (0, 0, 0, 0)
    with pytest.raises(NotFound, match="instance_id"):
        throughput(store.snapshot(), 10, Scope(instance_id="nope"), T0)
    with pytest.raises(NotFound, match="pool"):
        throughput(store.snapshot(), 10, Scope(pool="nope"), T0)


def test_stale_instances_are_not_counted():
    store = store_with(target("a"), target("b"))
    feed(store, "a", 5, tokens_per_s=100)
    now = feed(store, "b", 30, tokens_per_s=10)
    result = throughput(store.snapshot(), 10, Scope(), now)
    assert set(result.per_instance) == {"b"} and result.metrics.instances == 1


@pytest.mark.parametrize("asked, expected", [(0, 10.0), (2.5, 2.5), (300, 300)])
def test_window_resolution(asked, expected):
    assert resolve_window(asked, 10.0) == expected


@pytest.mark.parametrize("bad", [-1, 301, math.nan, math.inf])
def test_bad_windows_are_refused(bad):
    with pytest.raises(InvalidArgument, match="window_s"):
        resolve_window(bad, 10.0)


def test_gauges_average_over_instances_and_latencies_merge_conservatively():
    store = store_with(target("a"), target("b"))
    now = feed(store, "a", 10, batch_fill=0.5, accelerator_utilization=0.2, proposed_tokens_total=0,
               ttft=Latency(10, 20, 30, 12, 100))
    feed(store, "b", 10, batch_fill=1.0, accelerator_utilization=0.8, utilization_source=UtilizationSource.NVML,
         ttft=Latency(20, 40, 90, 22, 300))
    m = throughput(store.snapshot(), 10, Scope(), now).metrics
    assert m.batch_fill == pytest.approx(0.75)
    assert m.accelerator_utilization == pytest.approx(0.5)
    assert m.utilization_source == UtilizationSource.UNSPECIFIED  # a mix has no single source
    assert m.ttft == Latency(p50_ms=17.5, p95_ms=40, p99_ms=90, mean_ms=19.5, count=400)
    assert merge_latency([]) == Latency()


def test_latency_covers_the_window_asked_for_not_only_the_newest_report():
    """Each report summarises its instance's last window_s (10 s); a 60 s window merges the reports whose
    windows tile it (not every overlapping one, which would count a request many times), and keeps the
    first tokens of streams still running 50 s later (2026-12-02: the 60 s window said ttft.count 0)."""
    store = store_with(target("a"))
    now = feed(store, "a", 59.5, window_s=10.0, ttft=Latency(10, 20, 30, 12, 5))
    assert throughput(store.snapshot(), 60, Scope(), now).metrics.ttft.count == 30  # 6 windows of 10 s, 5 each
    assert throughput(store.snapshot(), 10, Scope(), now).metrics.ttft.count == 5  # the newest covers it
    assert throughput(store.snapshot(), 5, Scope(), now).metrics.ttft.count == 5  # finer than an instance's window


def test_an_instance_that_appeared_inside_the_window_adds_its_share_of_the_window():
    """A target the scaler started 5 s ago serves 100 tok/s; over a 60 s window the fleet served 100 tok/s
    plus its 5 s of them, not 200 (2026-12-02: the fleet's 60 s figure went from 586 to 2090 tok/s within
    5 s of a scale-up, and the scaler reads its pool's load there). Its own figure stays its rate."""
    store = store_with(target("a"), target("b"))
    now = feed(store, "a", 60, tokens_per_s=100)
    t = now - 5.0
    while t <= now + 1e-9:
        store.add("b", report("b", t, tokens_per_s=100, skew=0.0, tokens_generated_total=int(100 * (t - now + 5))))
        t += 0.5
    result = throughput(store.snapshot(), 60, Scope(), now)
    assert result.per_instance["b"].tokens_per_second == pytest.approx(100, rel=0.02)
    assert result.metrics.tokens_per_second == pytest.approx(100 + 100 * 5 / 60, rel=0.02)
    # Over 5 s, both were there the whole window.
    assert throughput(store.snapshot(), 4, Scope(), now).metrics.tokens_per_second == pytest.approx(200, rel=0.05)


def test_acceptance_and_error_rates_are_ratios_of_counter_increments():
    store = store_with(target("a"))
    for i in range(11):
        store.add("a", report("a", T0 + i, requests_total=10 * i, errors_total=i,
                              proposed_tokens_total=40 * i, accepted_tokens_total=30 * i))
    m = throughput(store.snapshot(), 10, Scope(), T0 + 10).metrics
    assert m.acceptance_rate == pytest.approx(0.75) and m.error_rate == pytest.approx(0.1)


def test_store_trims_to_retention_and_ignores_unknown_instances():
    store = ReportStore(retention_s=5)
    store.set_listed([target("a")], now=T0)
    for i in range(20):
        store.add("a", report("a", T0 + i))
    assert [r.received_at for r in store.snapshot().reports["a"]][0] == T0 + 14
    assert store.add("ghost", report("ghost", T0)) is False
    added, removed = store.set_listed([target("b")], now=T0 + 20)
    assert (added, removed) == (["b"], ["a"]) and "a" not in store.snapshot().reports


# -- analysis -------------------------------------------------------------------

def test_no_healthy_instances_is_critical_per_pool():
    store = store_with(target("a", "p1", healthy=False), target("b", "p2", healthy=True))
    recs = analyze(store.snapshot(), 10, Scope(), T0).recommendations
    assert [(r.rule, r.subject, r.severity) for r in recs] == [("no_healthy_instances", "p1", Severity.CRITICAL)]


def test_no_instance_at_all_is_critical_for_the_fleet():
    recs = analyze(ReportStore(330).snapshot(), 10, Scope(), T0).recommendations
    assert [(r.rule, r.subject) for r in recs] == [("no_healthy_instances", "")]
    assert "not been reached" in recs[0].bottleneck


def test_an_instance_registered_as_a_target_that_reports_as_a_draft_is_not_counted():
    """A draft registered by mistake as a target (the router shows it NOT_SERVING, "not a target")
    answers Stats/Watch as a draft: it is not one of the pool's targets, and does not dilute its
    saturation or count as its capacity."""
    store = store_with(target("real"), target("wrong"))
    now = feed(store, "real", 10, tokens_per_s=100, accelerator_utilization=1.0, running=8)
    feed(store, "wrong", 10, role=Role.DRAFT, tokens_per_s=0, accelerator_utilization=0.0)
    result = throughput(store.snapshot(), 10, Scope(pool="default"), now)
    assert result.counted == ("real",) and result.metrics.instances == 1
    assert result.metrics.accelerator_utilization == pytest.approx(1.0)
    assert "wrong" in result.per_instance  # still shown on its own


def test_queued_work_with_idle_accelerator_and_part_empty_batches():
    store = store_with(target("a"), target("b"))
    now = feed(store, "a", 10, queue_length=5, accelerator_utilization=0.2, batch_fill=0.25)
    feed(store, "b", 10, queue_length=0, accelerator_utilization=0.2, batch_fill=0.25)
    recs = analyze(store.snapshot(), 10, Scope(), now).recommendations
    # The batch has room: admission holds the queue (low_batch_fill), not the batch bounds (which
    # low_utilization_with_queue would tell to raise, against low_batch_fill's advice).
    assert {(r.rule, r.subject) for r in recs} == {("low_batch_fill", "a")}
    low = next(r for r in recs if r.rule == "low_batch_fill")
    assert low.evidence["batch_fill"] == pytest.approx(0.25) and "max_batch_tokens" in low.action


def test_error_rate_and_acceptance_rules():
    store = store_with(target("a"))
    for i in range(11):
        store.add("a", report("a", T0 + i, requests_total=10 * i, errors_total=5 * i,
                              proposed_tokens_total=40 * i, accepted_tokens_total=8 * i))
    recs = analyze(store.snapshot(), 10, Scope(), T0 + 10).recommendations
    assert [(r.rule, r.severity) for r in recs] == [("high_error_rate", Severity.CRITICAL),
                                                     ("low_acceptance_rate", Severity.INFO)]


def test_a_healthy_busy_fleet_has_no_recommendation():
    store = store_with(target("a"))
    now = feed(store, "a", 10, tokens_per_s=100, requests_per_s=2, queue_length=3, accelerator_utilization=0.9,
               batch_fill=0.9)
    assert analyze(store.snapshot(), 10, Scope(), now).recommendations == []


# -- alert hysteresis -------------------------------------------------------------

def _rec(rule="r", subject="s", severity=Severity.WARNING):
    from monitor.analysis import Recommendation

    return Recommendation(rule, severity, "b", "a", "e", subject, 0.1, 0.5)


def test_alerts_fire_after_for_s_and_clear_after_clear_s():
    tracker = AlertTracker(for_s=2, clear_s=3)
    assert tracker.update([_rec()], 0) == []
    assert tracker.update([_rec()], 1) == []
    fired = tracker.update([_rec()], 2)
    assert [(a.rule, a.firing) for a in fired] == [("r", True)]
    assert tracker.update([_rec()], 3) == []  # still firing: no repeat
    assert tracker.update([], 4) == []  # gone, but not for clear_s yet
    assert tracker.update([_rec()], 5) == []  # back: the alert never cleared
    assert tracker.update([], 7) == []
    cleared = tracker.update([], 8)
    assert [(a.rule, a.firing) for a in cleared] == [("r", False)] and tracker.firing() == []


def test_a_flapping_condition_below_for_s_never_fires():
    tracker = AlertTracker(for_s=2, clear_s=0)
    for t in range(10):
        assert tracker.update([_rec()] if t % 2 == 0 else [], t) == []


def test_a_fleet_that_is_starting_raises_no_alert_and_one_that_never_comes_up_does():
    """Found by a new user: every `llmesh up` fired no_healthy_instances while the models loaded."""
    tracker = AlertTracker(for_s=5, clear_s=10, startup_grace_s=60)
    for t in (0, 10, 30, 59):  # the router not reached, then targets loading
        assert tracker.update([_rec(rule="no_healthy_instances")], t) == []
    assert tracker.update([], 62) == []  # up before the grace ended: nothing fired, nothing to clear
    assert tracker.firing() == []
    down = AlertTracker(for_s=5, clear_s=10, startup_grace_s=60)
    for t in (0, 30, 60, 64):
        assert down.update([_rec(rule="no_healthy_instances")], t) == []
    assert [a.rule for a in down.update([_rec(rule="no_healthy_instances")], 65)] == ["no_healthy_instances"]
    # After the start, a condition counts from when it is seen, as before.
    later = AlertTracker(for_s=5, clear_s=10, startup_grace_s=60)
    later.update([], 0)
    assert later.update([_rec()], 100) == [] and [a.rule for a in later.update([_rec()], 105)] == ["r"]


def test_escalation_fires_again_with_the_new_severity():
    tracker = AlertTracker(for_s=0, clear_s=0)
    assert tracker.update([_rec()], 0)[0].severity == Severity.WARNING
    assert tracker.update([_rec(severity=Severity.CRITICAL)], 1)[0].severity == Severity.CRITICAL


def test_decision_code_imports_neither_grpc_nor_stubs():
    import subprocess
    import sys

    code = ("import sys, monitor.analysis, monitor.metrics, monitor.store; "
            "bad = [m for m in sys.modules if m.startswith(('grpc', 'llmesh'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
