"""The scaling policy, pure: the formula, capacity measurement, windows, panic, and
property-style loops over seeded random inputs (bounds, no flapping, timely scale-up)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from scaler.policy import (SATURATED, SCALE_UP_COOL_DOWN_S, HostLimit, InstanceLoad, Memory, Policy, PoolMetrics,
                           WindowLoad, bounded, capacity, checked, decide, learn_capacity)
from services.common.errors import InvalidArgument

T0 = 1_000_000.0
CAP = 100.0  # tokens/s per instance


def metrics(current: int, load: float, *, short: float | None = None, window_s: float = 30.0,
            saturated: dict[str, float] | None = None) -> PoolMetrics:
    """A pool of ``current`` instances whose demand is ``load`` tokens/s (nothing queued)."""
    stable = WindowLoad(window_s, load, in_flight=4, running=4)
    panic = WindowLoad(6.0, load if short is None else short, in_flight=4, running=4)
    instances = tuple(InstanceLoad(k, v, 1.0) for k, v in (saturated or {}).items())
    return PoolMetrics(current, stable, panic, instances)


def policy(**kw) -> Policy:
    kw.setdefault("capacity_tokens_per_second", CAP)
    kw.setdefault("min_instances", 1)
    kw.setdefault("max_instances", 10)
    kw.setdefault("scale_up_window_s", 10.0)
    kw.setdefault("scale_down_window_s", 60.0)
    return checked(Policy(**kw))


def run(p: Policy, load_at, *, current: int = 1, start: float = T0, seconds: float = 300, tick: float = 2.0,
        memory: Memory = Memory()):
    """Ticks the policy; the pool follows each decision at once. Returns [(t, desired)] and the memory."""
    out, t = [], start
    while t <= start + seconds:
        d = decide(metrics(current, load_at(t)), p, memory, t)
        memory, current = d.memory, d.desired
        out.append((t, current))
        t += tick
    return out, memory


# -- the formula -------------------------------------------------------------------

def test_desired_is_ceil_of_load_over_target_capacity_after_the_up_window():
    p = policy()
    d = decide(metrics(1, 150), p, Memory(), T0)  # 1.5× capacity: not yet panic
    assert d.desired == 1 and "calls for 3" in d.reason and "scale-up window" in d.reason
    d = decide(metrics(1, 150), p, d.memory, T0 + 10)
    assert d.desired == math.ceil(150 / (0.7 * CAP)) == 3
    assert d.reason.startswith("scale up:") and "configured estimate" in d.reason
    assert d.figures["load_tokens_per_second"] == 150 and d.figures["capacity_measured"] == 0


def test_demand_counts_queued_requests_at_the_running_ones_rate():
    w = WindowLoad(10, tokens_per_second=100, in_flight=12, running=4)
    assert w.demand == pytest.approx(300)
    assert WindowLoad(10, 100, in_flight=3, running=4).demand == 100
    assert WindowLoad(10, 0, in_flight=3, running=0).demand == 0


def test_within_the_tolerance_band_nothing_changes():
    p = policy(tolerance=0.1)
    # 3 instances at 0.7 × 100 = 210 tok/s target; 225 is +7 %: inside the band though ceil(225/70) = 4.
    out, _ = run(p, lambda t: 225, current=3, seconds=200)
    assert {n for _, n in out} == {3}
    # +15 % is outside it.
    out, _ = run(p, lambda t: 241.5, current=3, seconds=200)
    assert out[-1][1] == 4


def test_scale_down_waits_for_its_window_and_takes_the_highest_recommendation():
    p = policy(scale_down_window_s=60)
    # 4 instances; 30 s at a load that needs 3, then one that needs 1.
    out, _ = run(p, lambda t: 200 if t < T0 + 30 else 50, current=4, seconds=200, tick=2)
    changes = [(t - T0, n) for (t, n), (_, before) in zip(out[1:], out) if n != before]
    # At 60 s every recommendation of the window asked for fewer: the highest of them, 3.
    # Then the 1s alone fill a window (from 30 s on, with the pool at 3) at 90 s.
    assert changes == [(60, 3), (90, 1)]
    d = decide(metrics(3, 50), p, decide(metrics(3, 50), p, Memory(), T0).memory, T0 + 60)
    assert d.reason.startswith("scale down:") and "scale-down window 60 s" in d.reason


def test_bounds_and_manual_count_win():
    p = policy(min_instances=2, max_instances=3)
    assert decide(metrics(1, 0), p, Memory(), T0).desired == 2  # below min: at once
    assert decide(metrics(5, 0), p, Memory(), T0).desired == 3  # above max: at once
    manual = policy(min_instances=1, max_instances=5, manual_instances=4)
    d = decide(metrics(1, 10_000), manual, Memory(), T0)
    assert (d.desired, d.reason) == (4, "manual: ScaleTo 4")


def test_without_metrics_or_capacity_the_pool_holds_and_says_why():
    d = decide(PoolMetrics(2, error="UNAVAILABLE: monitor down"), policy(), Memory(), T0)
    assert d.desired == 2 and "UNAVAILABLE: monitor down" in d.reason
    d = decide(metrics(2, 500), policy(capacity_tokens_per_second=0), Memory(), T0)
    assert d.desired == 2 and "capacity unknown" in d.reason and d.capacity is None


# -- capacity -------------------------------------------------------------------------

def test_capacity_is_measured_at_saturation_and_replaces_the_estimate():
    p = policy(capacity_tokens_per_second=50)
    unsaturated = PoolMetrics(1, WindowLoad(30, 40), None, (InstanceLoad("a", 40, SATURATED - 0.2),))
    d = decide(unsaturated, p, Memory(), T0)
    assert capacity(d.memory, p).measured is False and "configured estimate" in d.reason
    saturated = PoolMetrics(1, WindowLoad(30, 120, 8, 4), None, (InstanceLoad("a", 120, 1.0),))
    d = decide(saturated, p, d.memory, T0 + 2)
    assert d.capacity.tokens_per_second == 120 and d.capacity.measured
    assert "measured at saturation" in d.reason and d.figures["capacity_measured"] == 1


def test_capacity_is_the_median_recent_saturated_rate_and_outlives_its_samples():
    m = learn_capacity(Memory(), (InstanceLoad("a", 100, 1.0), InstanceLoad("b", 140, 0.95),
                                  InstanceLoad("c", 400, 0.5)), T0)  # c was not saturated: not a sample
    m = learn_capacity(m, (InstanceLoad("a", 90, 1.0),), T0 + 10)
    assert m.measured == 100 and len(m.samples) == 3
    m = learn_capacity(m, (InstanceLoad("a", 80, 1.0),), T0 + 10_000)  # the old samples aged out
    assert m.measured == 80
    m = learn_capacity(m, (), T0 + 100_000)  # nothing recent: the last measurement stays
    assert m.measured == 80 and m.samples == ()


# -- panic -------------------------------------------------------------------------------

def test_panic_scales_up_at_once_and_holds_scale_down():
    p = policy(scale_up_window_s=60, scale_down_window_s=10)
    d = decide(metrics(1, 120, short=450), p, Memory(), T0)  # 4.5× one instance's capacity
    assert d.panic and d.desired == math.ceil(450 / 70) == 7 and d.reason.startswith("panic:")
    # The load falls at once: still no scale-down for a stable window after the last overload.
    d2 = decide(metrics(7, 50, short=50, window_s=30), p, d.memory, T0 + 20)
    assert d2.desired == 7 and "scale-down held" in d2.reason
    later, memory = None, d2.memory
    for t in range(22, 120, 2):
        later = decide(metrics(7, 50, short=50, window_s=30), p, memory, T0 + t)
        memory = later.memory
        if later.desired < 7:
            break
    assert later.desired == 1 and t == 30  # a stable window after the overload, 10 s after the load fell


# -- the backend's limit ---------------------------------------------------------------------

LAPTOP = HostLimit(1, "the host: 2 cores, 2 threads per target")


def test_the_hosts_limit_caps_a_decision_and_says_so():
    """The suite's own target already takes the host's cores: panic asks for 7, the host allows 1."""
    p = policy(scale_up_window_s=60)
    overloaded = dataclasses.replace(metrics(1, 120, short=450), limit=LAPTOP)
    d = decide(overloaded, p, Memory(), T0)
    assert d.desired == 1 and d.reason.startswith("panic:") and "scale to 7" in d.reason
    assert d.reason.endswith("; capped at 1 by the host: 2 cores, 2 threads per target")
    assert d.figures["host_max_instances"] == 1 and d.figures["capped"] == 1 and d.figures["desired"] == 1
    # Above the limit already (started before it was known): down to it.
    d = decide(dataclasses.replace(metrics(3, 50), limit=LAPTOP), p, Memory(), T0)
    assert d.desired == 1 and "capped at 1 by the host" in d.reason
    # Within it, and without one (Docker, Kubernetes): the policy's bounds alone.
    roomy = HostLimit(4, "the host: 8 cores, 2 threads per target")
    assert decide(dataclasses.replace(overloaded, limit=roomy), p, Memory(), T0).desired == 4
    d = decide(metrics(1, 120, short=450), p, Memory(), T0)
    assert d.desired == 7 and "capped" not in d.reason and "host_max_instances" not in d.figures


def test_property_never_above_the_hosts_limit():
    rng = random.Random(4)
    for _ in range(200):
        p = random_policy(rng)
        limit = HostLimit(rng.randint(1, 6), "the host")
        memory, t, current = Memory(), T0, rng.randint(0, 8)
        for _ in range(30):
            t += rng.uniform(0.1, 20)
            load = rng.uniform(0, 5000)
            d = decide(PoolMetrics(current, WindowLoad(30, load, 8, 4), WindowLoad(6, load * rng.uniform(0.5, 4)),
                                   (InstanceLoad("a", rng.uniform(1, 500), 1.0),), limit=limit), p, memory, t)
            assert d.desired <= limit.instances, (p, limit, current, d)
            memory, current = d.memory, d.desired


# -- a scale-up that added no capacity ----------------------------------------------------------

def shared(current: int, load: float, total: float, *, starting: int = 0) -> PoolMetrics:
    """``current`` saturated instances that share ``total`` tok/s (one host's cores) while clients ask for
    ``load``: 4 running, the rest queued."""
    per = total / max(current - starting, 1)
    serving = tuple(InstanceLoad(f"t{i}", per, 1.0) for i in range(current - starting))
    in_flight = max(4, round(4 * load / total))
    return PoolMetrics(current, WindowLoad(30, total, in_flight, 4), WindowLoad(6, total, in_flight, 4), serving,
                       starting=starting)


def test_a_scale_up_that_added_no_capacity_is_not_followed_by_another():
    p = policy(max_instances=8, scale_up_window_s=10, capacity_tokens_per_second=0)
    # One instance serves 100 tok/s at saturation; clients ask for 250: panic, 1 → 4.
    d = decide(shared(1, 250, 100), p, Memory(), T0)
    assert (d.desired, d.capacity.measured) == (4, True) and d.reason.startswith("panic:")
    d = decide(shared(4, 250, 100, starting=3), p, d.memory, T0 + 2)  # starting: not judged yet
    # All serving, and they share the same cores: 4 × 25 = 100 tok/s, as before. Without the check the
    # measured capacity (25 per instance) calls for ceil(250 / 17.5) = 15 at once: panic to max_instances 8.
    d = decide(shared(4, 250, 100), p, d.memory, T0 + 4)
    assert d.desired == 4 and d.figures["scale_up_held"] == 1 and d.figures["scale_up_stalled"] == 0
    assert d.reason.startswith("scale-up to 8 held at 4: measuring what the scale-up from 1 to 4 instance(s) added")
    t, memory = T0 + 6, d.memory
    while t <= T0 + 4 + 30 + 10:  # a stable window later it is judged: it added nothing, and stays held
        d = decide(shared(4, 250, 100), p, memory, t)
        memory, t = d.memory, t + 2
        assert d.desired == 4, (t, d.reason)
    assert d.figures["scale_up_stalled"] == 1 and d.figures["scale_up_held"] == 1
    assert d.reason.startswith("scale-up to 8 held at 4: the scale-up from 1 to 4 instance(s) did not add capacity")
    assert "from 100.0 to 100.0 tok/s" in d.reason and "no scale-up until capacity is measured to grow" in d.reason

    # Held for the cool-down, then allowed again.
    d = decide(shared(4, 250, 100), p, memory, t + SCALE_UP_COOL_DOWN_S - 60)
    assert d.desired == 4
    d = decide(shared(4, 250, 100), p, d.memory, t + SCALE_UP_COOL_DOWN_S)
    assert d.desired == 8 and "cool-down passed" in d.reason

    # ... or as soon as capacity is measured to grow (the other work on the host ended).
    d = decide(shared(4, 250, 200), p, memory, t)
    assert d.desired > 4 and "capacity measured to grow to 200.0 tok/s" in d.reason
    assert d.figures["scale_up_stalled"] == 0


def test_a_scale_up_that_added_capacity_is_followed_by_another():
    p = policy(max_instances=8, scale_up_window_s=10, capacity_tokens_per_second=0)
    d = decide(shared(1, 250, 100), p, Memory(), T0)
    memory = d.memory
    for t in range(2, 32, 2):  # each of the 4 serves 100 tok/s: capacity grew fourfold
        d = decide(shared(4, 400, 400), p, memory, T0 + t)
        memory = d.memory
        assert d.desired == 4 and "added 300.0" not in d.reason
    d = decide(shared(4, 400, 400), p, memory, T0 + 32)  # judged a stable window after they all served
    assert "the scale-up from 1 to 4 instance(s) added 300.0 tok/s of capacity (100.0 → 400.0)" in d.reason
    assert d.figures["scale_up_stalled"] == 0 and d.figures["scale_up_held"] == 0
    memory = d.memory
    d = decide(shared(4, 1200, 400), p, memory, T0 + 34)  # and the load triples: panic again
    assert d.desired == 8 and d.reason.startswith("panic:")


# -- properties ----------------------------------------------------------------------------

def random_policy(rng: random.Random) -> Policy:
    lo = rng.randint(0, 4)
    hi = rng.randint(max(lo, 1), 12)
    return checked(Policy(min_instances=lo, max_instances=hi, target_utilization=rng.uniform(0.3, 1.0),
                          tolerance=rng.uniform(0.0, 0.3), scale_up_window_s=rng.uniform(1, 60),
                          scale_down_window_s=rng.uniform(1, 300),
                          capacity_tokens_per_second=rng.choice([0.0, rng.uniform(1, 500)]),
                          panic_threshold=rng.uniform(1.1, 4.0)))


def test_property_never_outside_the_bounds():
    rng = random.Random(1)
    for _ in range(300):
        p = random_policy(rng)
        memory, t, current = Memory(), T0, rng.randint(0, 15)
        for _ in range(40):
            t += rng.uniform(0.1, 20)
            stable = None if rng.random() < 0.1 else WindowLoad(
                rng.uniform(1, 60), rng.choice([0.0, rng.uniform(0, 5000)]), rng.randint(0, 64), rng.randint(0, 32))
            panic = WindowLoad(3, rng.uniform(0, 20_000), rng.randint(0, 64), rng.randint(0, 32))
            insts = tuple(InstanceLoad(str(i), rng.uniform(0, 800), rng.random()) for i in range(rng.randint(0, 4)))
            d = decide(PoolMetrics(current, stable, panic, insts, "" if stable else "down"), p, memory, t)
            assert p.min_instances <= d.desired <= p.max_instances, (p, current, d)
            memory = d.memory
            current = d.desired if rng.random() < 0.8 else rng.randint(0, 15)


def test_property_no_flapping_under_a_constant_load():
    """A constant load (noise well inside the tolerance band) moves the pool in one direction at most."""
    rng = random.Random(2)
    for _ in range(200):
        p = random_policy(rng)
        if p.capacity_tokens_per_second == 0:
            p = checked(Policy(**{**p.__dict__, "capacity_tokens_per_second": 100.0}))
        base = rng.uniform(0, 3000)
        eps = p.tolerance / 3
        out, _ = run(p, lambda t: base * (1 + rng.uniform(-eps, eps)), current=rng.randint(p.min_instances,
                                                                                             p.max_instances),
                     seconds=900, tick=rng.uniform(0.5, 5))
        counts = [n for _, n in out]
        moves = [b - a for a, b in zip(counts, counts[1:]) if b != a]
        assert all(m > 0 for m in moves) or all(m < 0 for m in moves), (p, base, counts)
        assert counts[-1] == counts[len(counts) // 2], (p, base, counts)  # settled


def test_property_scale_up_within_the_up_window_of_a_load_step():
    rng = random.Random(3)
    for _ in range(200):
        p = random_policy(rng)
        if p.capacity_tokens_per_second == 0:
            p = checked(Policy(**{**p.__dict__, "capacity_tokens_per_second": 100.0}))
        if p.max_instances < 2:
            continue
        cap, target = p.capacity_tokens_per_second, p.target_utilization
        tick = rng.uniform(0.5, 3)
        low = rng.uniform(0, 0.5) * target * cap  # needs one instance
        before, memory = run(p, lambda t: low, current=max(1, p.min_instances), seconds=p.scale_down_window_s + 30,
                             tick=tick)
        settled = before[-1][1]
        if settled >= p.max_instances:
            continue
        n_high = rng.randint(settled + 1, p.max_instances)
        high = (n_high - 0.5) * target * cap * (1 + p.tolerance)  # calls for more than ``settled``, outside the band
        step = before[-1][0] + tick
        after, _ = run(p, lambda t: high, current=settled, start=step, seconds=p.scale_up_window_s + 3 * tick,
                       tick=tick, memory=memory)
        first_up = next(t for t, n in after if n > settled)
        assert first_up - step <= p.scale_up_window_s + tick + 1e-9, (p, tick, first_up - step)


def test_checked_applies_documented_defaults():
    p = checked(Policy(min_instances=0, max_instances=3, target_utilization=0, tolerance=0, scale_up_window_s=0,
                       scale_down_window_s=0, drain_timeout_s=0, panic_threshold=0))
    assert (p.target_utilization, p.tolerance, p.scale_up_window_s, p.panic_threshold) == (0.7, 0.1, 30.0, 2.0)
    with pytest.raises(InvalidArgument) as err:
        checked(Policy(min_instances=5, max_instances=4))
    assert err.value.field == "policy.max_instances"
    with pytest.raises(InvalidArgument) as err:
        checked(Policy(capacity_tokens_per_second=-1))
    assert err.value.field == "policy.capacity_tokens_per_second"


@pytest.mark.parametrize("current", range(0, 12))
def test_bounded_clamps(current):
    p = Policy(min_instances=2, max_instances=6)
    assert bounded(current, p) == max(2, min(6, current))


def test_policy_and_state_import_neither_grpc_nor_stubs():
    import subprocess
    import sys

    code = ("import sys, scaler.policy, scaler.state; "
            "bad = [m for m in sys.modules if m.startswith(('grpc', 'llmesh'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_idle_pool_scales_down_to_its_minimum_though_its_capacity_is_unknown():
    """No load at all needs no capacity figure: min_instances serve it, after the scale-down window (an idle
    pool of min 0 held its target for ever, "capacity unknown")."""
    p = policy(capacity_tokens_per_second=0, min_instances=0, scale_down_window_s=60)
    idle = PoolMetrics(1, WindowLoad(30.0, 0.0), WindowLoad(6.0, 0.0))
    memory, reasons = Memory(), []
    for t in range(0, 62, 2):
        d = decide(idle, p, memory, T0 + t)
        memory = d.memory
        reasons.append((t, d.desired))
    assert [n for t, n in reasons if t < 60] == [1] * 30 and reasons[-1] == (60, 0)
    assert d.reason.startswith("scale down: no load over 30 s")
    # Any load, or work in flight, and the capacity is needed again: it holds.
    busy = PoolMetrics(1, WindowLoad(30.0, 0.0, in_flight=1, running=1), WindowLoad(6.0, 0.0))
    assert "capacity unknown" in decide(busy, p, Memory(), T0).reason
