"""`llmesh status` with the scaler's pools and the monitor's top recommendation (rendering, pure)."""

from __future__ import annotations

from services.cli import status


def snapshot(**extra):
    return {
        "services": [{"name": "router", "address": "r:1", "health": "SERVING"}],
        "instances": [],
        "throughput": {"window_s": 10.0, "requests_per_second": 1.5, "tokens_per_second": 41.5,
                       "accelerator_utilization": 0.5, "queue_length": 2, "in_flight": 5, "instances": 1},
        **extra,
    }


POOL = {"pool": "default", "role": "target", "current": 2, "desired": 3, "starting": 1, "draining": 0,
        "reason": "scale up: load 300.0 tok/s ...", "capacity_tokens_per_second": 120.0, "capacity_measured": True,
        "panic": False, "min_instances": 1, "max_instances": 3,
        "managed": [{"id": "default-auto-1", "state": "starting", "backend_ref": "pid 42"}]}
REC = {"rule": "scale_out", "severity": "warning", "subject": "default", "bottleneck": "pool default is at capacity",
       "action": "add 1 instance(s) to pool default", "expected_effect": "the queue drains", "evidence": {}}


def test_pools_desired_counts_and_the_top_recommendation():
    text = status.render(snapshot(pools=[POOL], backend="local", recommendation=REC, recommendations=3))
    lines = text.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("POOL")))
    assert lines[header].split() == ["POOL", "ROLE", "CURRENT", "DESIRED", "STARTING", "DRAINING", "BOUNDS",
                                     "CAPACITY"]
    assert lines[header + 1].split()[:7] == ["default", "target", "2", "3", "1", "0", "1-3"]
    assert "120.0 tok/s (measured)" in lines[header + 1]
    assert "  default: scale up: load 300.0 tok/s ..." in lines
    assert "  default: started by the local scaler: default-auto-1 starting (pid 42)" in lines
    assert "top recommendation [warning] scale_out (default): pool default is at capacity" in lines
    assert "  do: add 1 instance(s) to pool default" in lines
    assert lines[-1] == "  expect: the queue drains (2 more: llmesh status --json)"


def test_no_recommendation_and_an_unreachable_scaler_are_said_plainly():
    text = status.render(snapshot(pools_error="UNAVAILABLE: down", recommendation=None, recommendations=0))
    assert "pools: unknown (scaler: UNAVAILABLE: down)" in text
    assert text.splitlines()[-1] == "top recommendation: none (nothing limits the fleet)"


def test_bounds_show_the_hosts_cap_where_it_is_lower():
    """The local backend's cap (figures host_max_instances) beside the policy's bounds: an operator
    reading "1-8" alone would wonder why a saturated pool stays at one instance."""
    capped = {**POOL, "max_instances": 8, "host_max_instances": 1}
    loose = {**POOL, "pool": "big", "max_instances": 3, "host_max_instances": 6}
    text = status.render(snapshot(pools=[capped, loose], backend="local"))
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith(("default", "big"))}
    assert "1-8 (host: 1)" in rows["default"]
    assert " 1-3 " in rows["big"] and "host" not in rows["big"]
