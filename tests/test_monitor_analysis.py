"""The monitor's bottleneck rules, one snapshot per rule, and the figures they read
(saturation, queue growth, the standard windows)."""

from __future__ import annotations

import pytest

from monitor.analysis import Severity, Thresholds, analyze
from monitor.metrics import Scope, standard_windows, throughput
from monitor.store import InstanceInfo
from services.common.load import Latency, Role
from tests.test_monitor_metrics import T0, feed, report, store_with, target

HEALTHY = dict(tokens_per_s=100, requests_per_s=2, accelerator_utilization=0.9, batch_fill=0.9, running=7,
               in_flight=7, ttft=Latency(80, 150, 200, 90, 50))


def rules(store, now, thresholds=Thresholds(), scope=Scope()):
    recs = analyze(store.snapshot(), 10, scope, now, thresholds).recommendations
    for r in recs:  # every recommendation explains itself
        assert r.evidence and r.action and r.expected_effect and r.bottleneck, r
    return recs


def only(recs, rule):
    (rec,) = [r for r in recs if r.rule == rule]
    return rec


@pytest.mark.parametrize("fleet", [
    dict(HEALTHY),
    dict(HEALTHY, queue_length=3),  # a steady queue at full utilisation: busy, not bottlenecked
    dict(tokens_per_s=30, requests_per_s=1, accelerator_utilization=0.95, batch_fill=1 / 32, running=1,
         in_flight=1),  # one stream keeps a CPU engine busy: nothing to fix
    dict(tokens_per_s=0, requests_per_s=0),  # idle
])
def test_a_healthy_snapshot_yields_no_bottleneck(fleet):
    store = store_with(target("a"), target("b"))
    now = feed(store, "a", 10, **fleet)
    feed(store, "b", 10, **fleet)
    assert rules(store, now, Thresholds(target_requests_per_second=3.0)) == []


def test_host_side_bottleneck_low_utilisation_with_work_queued():
    store = store_with(target("a"))
    now = feed(store, "a", 10, queue_length=6, accelerator_utilization=0.2, batch_fill=0.9, running=7,
               kv_cache_usage=0.95)
    rec = only(rules(store, now), "low_utilization_with_queue")
    assert rec.subject == "a" and rec.severity == Severity.WARNING and "host-side" in rec.bottleneck
    assert rec.evidence["queue_length"] == 6 and rec.evidence["accelerator_utilization"] == pytest.approx(0.2)
    assert "kv_cache_memory" in rec.action  # the KV cache is the bound here
    assert "tokens/s" in rec.expected_effect


def test_batch_fill_below_0_7_with_requests_waiting():
    store = store_with(target("a"))
    now = feed(store, "a", 10, queue_length=4, accelerator_utilization=0.8, batch_fill=0.4, running=3,
               queue_time=Latency(300, 500, 600, 320, 40))
    rec = only(rules(store, now), "low_batch_fill")
    assert rec.value == pytest.approx(0.4) and rec.threshold == 0.7
    assert "max_wait_ms" in rec.action and "max_batch_size" in rec.action
    assert rec.evidence["queue_time_p50_ms"] == 300


def test_a_batch_full_now_is_not_told_to_shrink_whatever_its_mean_fill():
    """A window that saw the batch ramp up to full has a low mean fill; with the batch full now and requests
    waiting, "lower max_batch_size" would contradict low_utilization_with_queue's "raise max_batch_size"
    (2026-12-02: both in one answer, 32 of 32 running, 68 queued)."""
    store = store_with(target("a"))
    now = feed(store, "a", 10, queue_length=68, accelerator_utilization=0.2, batch_fill=0.63, running=32,
               max_batch_size=32)
    found = {r.rule for r in rules(store, now)}
    assert "low_batch_fill" not in found and "low_utilization_with_queue" in found


def test_growing_queues_call_for_scaling_out():
    store = store_with(target("a", "p"), target("b", "p"))
    t = T0
    for i in range(21):  # the queues grow by one request per second each, at full utilisation
        for key in ("a", "b"):
            store.add(key, report(key, t, tokens_per_s=100, requests_per_s=2, queue_length=i, running=8,
                                  accelerator_utilization=0.95, batch_fill=1.0))
        t += 1
    rec = only(rules(store, t - 1), "scale_out")
    assert rec.subject == "p" and rec.evidence["queue_growth_per_second"] == pytest.approx(2.0)
    assert rec.evidence["queue_length"] == 40 and rec.evidence["instances"] == 2
    assert "add 1 instance(s) to pool p" in rec.action


def test_a_pool_saturated_with_a_steady_queue_calls_for_scaling_out():
    """A queue that holds steady behind a full batch is a full pool too (2026-12-02: 32 of 32 running and 8
    queued for 50 s, and Analyze said nothing limits the fleet)."""
    store = store_with(target("a", "p"))
    now = feed(store, "a", 10, tokens_per_s=700, requests_per_s=1, queue_length=8, running=32, max_batch_size=32,
               accelerator_utilization=0.8, batch_fill=1.0)
    rec = only(rules(store, now), "scale_out")
    assert rec.subject == "p" and "saturated in 100% of the window with 8 request(s) waiting" in rec.bottleneck
    assert rec.value == pytest.approx(1.0) and rec.threshold == 0.9


def test_requests_below_the_configured_target_with_work_waiting_call_for_scaling_out():
    store = store_with(target("a", "p"))
    now = feed(store, "a", 10, tokens_per_s=100, requests_per_s=2, queue_length=2, running=8,
               accelerator_utilization=0.95, batch_fill=1.0)
    rec = only(rules(store, now, Thresholds(target_requests_per_second=5)), "scale_out")
    assert rec.evidence["requests_per_second"] == pytest.approx(2, rel=0.01)
    assert rec.evidence["target_requests_per_second"] == 5 and "add 2 instance(s)" in rec.action
    # The same pool meeting its target is fine.
    assert [r.rule for r in rules(store, now, Thresholds(target_requests_per_second=1.5))] == []


def test_low_acceptance_calls_for_a_lower_gamma_or_no_speculation():
    store = store_with(target("a"))
    for i in range(11):
        store.add("a", report("a", T0 + i, requests_total=10 * i, proposed_tokens_total=40 * i,
                              accepted_tokens_total=8 * i, accelerator_utilization=0.9, batch_fill=0.9))
    rec = only(rules(store, T0 + 10), "low_acceptance_rate")
    assert rec.evidence["acceptance_rate"] == pytest.approx(0.2) and "gamma" in rec.action
    assert "speculation off" in rec.action


def test_high_ttft_at_low_utilisation_points_at_the_prefill_budget():
    store = store_with(target("a"))
    now = feed(store, "a", 10, tokens_per_s=20, requests_per_s=1, accelerator_utilization=0.3,
               ttft=Latency(1500, 3500, 4000, 1800, 30), queue_time=Latency(10, 30, 40, 12, 30))
    rec = only(rules(store, now), "high_ttft_at_low_utilization")
    assert rec.evidence["ttft_p95_ms"] == 3500 and "max_batch_tokens" in rec.action
    # The same TTFT on a busy accelerator is a capacity matter, not this rule's.
    busy = store_with(target("b"))
    now = feed(busy, "b", 10, tokens_per_s=20, requests_per_s=1, accelerator_utilization=0.95,
               ttft=Latency(1500, 3500, 4000, 1800, 30))
    assert "high_ttft_at_low_utilization" not in [r.rule for r in rules(busy, now)]


def test_high_ttft_that_is_queue_time_behind_a_full_batch_points_at_the_batch_size():
    """2026-12-02, a trial: batch 4 of 4, queue time 99 % of a 4 s TTFT, 6-token prompts; the advice
    was "raise max_batch_tokens", which changes nothing there."""
    store = store_with(target("a"))
    now = feed(store, "a", 10, tokens_per_s=20, requests_per_s=1, accelerator_utilization=0.3, running=4,
               max_batch_size=4, queue_length=8, ttft=Latency(3000, 4077, 4200, 3100, 30),
               queue_time=Latency(2990, 4061, 4150, 3050, 30))
    rec = only(rules(store, now), "high_ttft_at_low_utilization")
    assert "max_batch_size" in rec.action and "max_batch_tokens" not in rec.action
    assert "4 of 4 running" in rec.bottleneck


def test_a_batch_with_room_is_not_told_to_grow_and_to_shrink_at_once():
    """8 of 32 running with a request waiting and the accelerator idle: low_batch_fill's advice
    (admission timing, "lower max_batch_size") alone, not also "raise max_batch_size"."""
    store = store_with(target("a"))
    now = feed(store, "a", 10, queue_length=2, accelerator_utilization=0.3, batch_fill=0.25, running=8,
               max_batch_size=32)
    found = [r.rule for r in rules(store, now)]
    assert "low_batch_fill" in found and "low_utilization_with_queue" not in found


def test_a_well_filled_batch_with_room_and_a_queue_on_an_idle_accelerator_is_still_advised():
    """26 of 32 running (fill 0.8, above low_batch_fill's 0.7), 3 waiting, 30 % busy: the queue is held
    by the token budget, not the batch size."""
    store = store_with(target("a"))
    now = feed(store, "a", 10, queue_length=3, accelerator_utilization=0.3, batch_fill=0.8, running=26,
               max_batch_size=32, kv_cache_usage=0.5)
    rec = only(rules(store, now), "low_utilization_with_queue")
    assert "max_batch_tokens" in rec.action and "max_batch_size" not in rec.action


def test_errors_and_ejections_point_at_an_unhealthy_instance():
    store = store_with(target("a", "p"), InstanceInfo("b", "b:1", Role.TARGET, "p", healthy=False, state="ejected",
                                                      serving=True, consecutive_failures=5))
    for i in range(11):
        store.add("a", report("a", T0 + i, requests_total=10 * i, errors_total=2 * i, accelerator_utilization=0.9,
                              batch_fill=0.9))
    recs = rules(store, T0 + 10)
    errors = only(recs, "high_error_rate")
    assert errors.subject == "a" and errors.evidence["error_rate"] == pytest.approx(0.2) and "unhealthy" in \
        errors.bottleneck
    ejected = only(recs, "unhealthy_instance")
    assert ejected.subject == "b" and ejected.evidence["consecutive_failures"] == 5 and "ejected" in ejected.bottleneck


def test_an_instance_not_serving_is_unhealthy_but_a_whole_dead_pool_is_reported_once():
    store = store_with(target("a", "p"), InstanceInfo("b", "b:1", Role.TARGET, "p", healthy=False, serving=False))
    assert [(r.rule, r.subject) for r in rules(store, T0)] == [("unhealthy_instance", "b")]
    dead = store_with(InstanceInfo("c", "c:1", Role.TARGET, "q", healthy=False, serving=False))
    assert [r.rule for r in rules(dead, T0)] == ["no_healthy_instances"]


def test_saturation_and_queue_growth_are_measured_from_the_reports():
    store = store_with(target("a"))
    for i in range(10):  # saturated (queue, or 7 of 8 slots) in 6 of 10 reports
        queue, running = (1, 3) if i < 3 else ((0, 7) if i < 6 else (0, 2))
        store.add("a", report("a", T0 + i, queue_length=queue, running=running))
    m = throughput(store.snapshot(), 9.5, Scope(), T0 + 9).metrics
    assert m.saturation == pytest.approx(0.6) and m.running == 2
    assert m.queue_growth_per_second == pytest.approx(-1 / 9)


def test_every_answer_covers_the_standard_windows():
    store = store_with(target("a"))
    for i in range(301):
        store.add("a", report("a", T0 + i, tokens_generated_total=100 * min(i, 250)))
    windows = standard_windows(store.snapshot(), (300, 10, 60), Scope(), T0 + 300)
    assert [w.window_s for w in windows] == [10, 60, 300]
    assert [round(w.tokens_per_second) for w in windows] == [0, round(1000 / 60), round(100 * 250 / 300)]
