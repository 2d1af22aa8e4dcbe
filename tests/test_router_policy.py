"""The router's pure decision code: registry transitions, policies, failover rules."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.config import PolicyName, RouterConfig
from router.failover import Outcome, decide, short_reason
from router.policy import POLICIES, Snapshot, choose, least_loaded, round_robin, score
from router.registry import Health, Instance, InstanceSpec, Load, Registry, Role, State
from services.common.config import ConfigError
from services.common.errors import InvalidArgument, NotFound

STALE = 2.0


def instance(name: str, *, state=State.ACTIVE, health=Health.SERVING, load: Load | None = Load(),
             load_at: float | None = 0.0, in_flight=0, failures=0, role=Role.TARGET) -> Instance:
    inst = Instance(InstanceSpec(id=name, address=f"127.0.0.1:{1000 + hash(name) % 1000}", role=role))
    inst.state, inst.health, inst.load = state, health, load
    inst.in_flight, inst.consecutive_failures = in_flight, failures
    inst.load_at = load_at if load is not None else None
    return inst


def random_fleet(rng: random.Random, now: float) -> list[Instance]:
    fleet = []
    for k in range(rng.randint(0, 8)):
        has_load = rng.random() < 0.8
        fleet.append(instance(
            f"i{k}", state=rng.choice(list(State)), health=rng.choice(list(Health)),
            load=Load(in_flight=rng.randint(0, 9), queue_length=rng.randint(0, 5),
                      accelerator_utilization=rng.random(), ttft_p50_ms=rng.uniform(0, 500)) if has_load else None,
            load_at=now - rng.uniform(0, 2 * STALE), in_flight=rng.randint(0, 5), failures=rng.randint(0, 3)))
    return fleet


def routable(inst: Instance, now: float) -> bool:
    return (inst.state is State.ACTIVE and inst.health is Health.SERVING and inst.load_at is not None
            and now - inst.load_at <= STALE)


@pytest.mark.parametrize("policy", list(PolicyName))
def test_never_chooses_unhealthy_draining_ejected_stale_or_excluded(policy):
    rng = random.Random(policy.value)
    now = 100.0
    for trial in range(500):
        fleet = random_fleet(rng, now)
        exclude = frozenset(i.id for i in fleet if rng.random() < 0.2)
        chosen = choose(policy, fleet, Snapshot(now=now, stale_after_s=STALE, sequence=trial, exclude=exclude))
        ok = [i for i in fleet if routable(i, now) and i.id not in exclude]
        if not ok:
            assert chosen is None
        else:
            assert chosen in ok


@pytest.mark.parametrize("policy", list(PolicyName))
def test_never_chooses_from_an_empty_or_all_bad_fleet(policy):
    now = 10.0
    bad = [instance("a", health=Health.NOT_SERVING), instance("b", state=State.DRAINING),
           instance("c", state=State.EJECTED), instance("d", load_at=now - 3 * STALE),
           instance("e", load=None), instance("f", health=Health.UNKNOWN)]
    assert choose(policy, [], Snapshot(now=now)) is None
    assert choose(policy, bad, Snapshot(now=now, stale_after_s=STALE)) is None


def test_round_robin_spreads_within_one():
    rng = random.Random(7)
    for n in range(1, 7):
        fleet = [instance(f"i{k}", load_at=0.0) for k in range(n)]
        for requests in (1, n, 3 * n + 1, 50):
            start = rng.randint(0, 1000)
            counts = Counter(choose(PolicyName.ROUND_ROBIN, fleet, Snapshot(now=1.0, sequence=start + s)).id
                             for s in range(requests))
            spread = [counts.get(i.id, 0) for i in fleet]
            assert max(spread) - min(spread) <= 1
            assert sum(spread) == requests


def test_round_robin_is_a_pure_function_of_the_sequence():
    fleet = [instance("b"), instance("a"), instance("c")]
    picks = [choose(PolicyName.ROUND_ROBIN, fleet, Snapshot(now=1.0, sequence=s)).id for s in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    assert round_robin(sorted(fleet, key=lambda i: i.id), Snapshot(now=1.0, sequence=4)).id == "b"


def test_least_loaded_takes_the_larger_of_reported_and_router_in_flight():
    fleet = [instance("a", load=Load(in_flight=5)), instance("b", load=Load(in_flight=1), in_flight=3),
             instance("c", load=Load(in_flight=2))]
    assert least_loaded(fleet, Snapshot(now=1.0)).id == "c"
    fleet[2].in_flight = 6
    assert least_loaded(fleet, Snapshot(now=1.0)).id == "b"


def test_least_loaded_ties_rotate():
    fleet = [instance(n) for n in "abc"]
    picks = {choose(PolicyName.LEAST_LOADED, fleet, Snapshot(now=1.0, sequence=s)).id for s in range(3)}
    assert picks == {"a", "b", "c"}


def test_least_loaded_ignores_stale_reports():
    fleet = [instance("a", load=Load(in_flight=9), load_at=0.0), instance("b", load=Load(in_flight=1), load_at=0.0)]
    assert choose(PolicyName.LEAST_LOADED, fleet, Snapshot(now=1.0, stale_after_s=STALE)).id == "b"
    fleet[1].load_at = -5.0  # stale: b is no longer routable at all
    assert choose(PolicyName.LEAST_LOADED, fleet, Snapshot(now=1.0, stale_after_s=STALE)).id == "a"


def test_score_weights_and_ranking():
    snap = Snapshot(now=1.0)
    idle = instance("idle", load=Load(accelerator_utilization=0.0, queue_length=0, ttft_p50_ms=0.0))
    assert score(idle, snap) == pytest.approx(1.0)
    busy = instance("busy", load=Load(accelerator_utilization=1.0, queue_length=3, ttft_p50_ms=900.0), failures=1)
    assert score(busy, snap) == pytest.approx(0.3 * 0 + 0.3 / 4 + 0.2 * 0.1 / 1.0 + 0.2 / 2)
    assert 0.0 <= score(busy, snap) < score(idle, snap) <= 1.0
    assert choose(PolicyName.SCORE, [busy, idle], snap).id == "idle"
    assert score(instance("down", health=Health.NOT_SERVING), snap) == 0.0


def test_every_policy_is_registered():
    assert set(POLICIES) == set(PolicyName)


# -- registry ---------------------------------------------------------------
def test_registry_register_update_drain_remove():
    reg = Registry()
    a, replaced = reg.upsert(InstanceSpec("a", "h:1"))
    assert replaced is None and a.state is State.ACTIVE and a.health is Health.UNKNOWN
    reg.drain("a")
    same, replaced = reg.upsert(InstanceSpec("a", "h:1", pool="p"))
    assert same is a and replaced is None and a.state is State.ACTIVE and a.spec.pool == "p"
    moved, replaced = reg.upsert(InstanceSpec("a", "h:2"))
    assert replaced is a and moved is not a and reg.get("a").address == "h:2"
    reg.upsert(InstanceSpec("d", "h:3", role=Role.DRAFT))
    assert [i.id for i in reg.select(Role.TARGET)] == ["a"] and [i.id for i in reg.select(Role.DRAFT)] == ["d"]
    reg.remove("a")
    with pytest.raises(NotFound):
        reg.remove("a")
    with pytest.raises(NotFound):
        reg.drain("zzz")
    with pytest.raises(InvalidArgument):
        reg.upsert(InstanceSpec("", "h:1"))


def test_failures_mark_unreachable_and_eject_until_readmitted():
    reg = Registry(eject_after_failures=2, eject_for_s=5.0)
    inst, _ = reg.upsert(InstanceSpec("a", "h:1"))
    reg.set_health("a", Health.SERVING)
    reg.record_load("a", Load(), now=0.0)
    assert inst.routable(0.0, STALE)
    reg.record_failure("a", now=0.0, unreachable="connection refused")
    assert inst.health is Health.NOT_SERVING and "connection refused" in inst.describe(0.0, STALE)
    reg.set_health("a", Health.SERVING)
    reg.record_failure("a", now=1.0)
    assert inst.state is State.EJECTED and not inst.routable(1.0, STALE)
    assert reg.readmit(now=5.9) == [] and inst.state is State.EJECTED
    assert reg.readmit(now=6.0) == [inst] and inst.state is State.ACTIVE
    reg.record_failure("a", now=6.5)  # half-open: one more failure ejects again
    assert inst.state is State.EJECTED
    reg.record_success("a")
    assert inst.consecutive_failures == 0


def test_in_flight_never_negative():
    reg = Registry()
    inst, _ = reg.upsert(InstanceSpec("a", "h:1"))
    reg.started("a")
    reg.finished("a")
    reg.finished("a")
    reg.finished("gone")
    assert inst.in_flight == 0


def test_describe_says_why_an_instance_is_out():
    now = 10.0
    assert instance("a", health=Health.NOT_SERVING).describe(now, STALE) == "a NOT_SERVING"
    assert instance("b", state=State.DRAINING).describe(now, STALE) == "b draining"
    assert "stale" in instance("c", load_at=now - 5).describe(now, STALE)
    assert "no load report" in instance("d", load=None).describe(now, STALE)
    assert instance("e", load_at=now).describe(now, STALE) == "e SERVING"


# -- failover ---------------------------------------------------------------
@pytest.mark.parametrize("code, streamed, attempts, expected", [
    ("UNAVAILABLE", 0, 1, Outcome.RETRY),
    ("RESOURCE_EXHAUSTED", 0, 1, Outcome.RETRY),
    ("INVALID_ARGUMENT", 0, 1, Outcome.FAIL),
    ("OUT_OF_RANGE", 0, 1, Outcome.FAIL),
    ("DEADLINE_EXCEEDED", 0, 1, Outcome.FAIL),
    ("UNAVAILABLE", 0, 3, Outcome.FAIL),
    ("UNAVAILABLE", 4, 1, Outcome.RESUME),
    ("CANCELLED", 4, 2, Outcome.RESUME),
    ("RESOURCE_EXHAUSTED", 4, 1, Outcome.FAIL),
    ("UNAVAILABLE", 4, 3, Outcome.FAIL),
])
def test_failover_decisions(code, streamed, attempts, expected):
    assert decide(code, streamed, attempts, max_attempts=3) is expected


def test_resume_can_be_switched_off():
    assert decide("UNAVAILABLE", 4, 1, 3, resume=False) is Outcome.FAIL


def test_short_reason():
    assert short_reason("failed to connect to all addresses; last error: ipv4:127.0.0.1:1: Connection refused") \
        == "connection refused"
    assert short_reason("") == "no details"
    assert len(short_reason("x" * 500)) == 80


# -- config -----------------------------------------------------------------
def test_config_from_flags_and_env():
    c = RouterConfig.from_args(["--targets", "127.0.0.1:1,127.0.0.1:2", "--policy", "least_loaded"],
                               env={"LLMESH_ROUTER_DRAFTS": "127.0.0.1:3", "LLMESH_MAX_ATTEMPTS": "5"})
    assert c.targets == ["127.0.0.1:1", "127.0.0.1:2"] and c.drafts == ["127.0.0.1:3"]
    assert c.policy is PolicyName.LEAST_LOADED and c.max_attempts == 5 and c.port == 50051
    with pytest.raises(ConfigError, match="targets"):
        RouterConfig.from_namespace({"targets": ["nope"]}, env={})
    with pytest.raises(ConfigError, match="max_attempts"):
        RouterConfig.from_namespace({"max_attempts": 0}, env={})
    with pytest.raises(SystemExit):
        RouterConfig.from_args(["--policy", "random"], env={})
