"""The router's pure decision code: registry transitions, policies, failover rules."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.admission import Admission
from router.cache import ResponseCache
from router.config import PolicyName, RouterConfig
from router.failover import Outcome, decide, short_reason
from router.policy import (POLICIES, Snapshot, Weights, choose, eligible, least_loaded, load_of, pair, power_of_two,
                           round_robin, score)
from router.policy_prefix import PrefixTable, prefix_blocks
from router.registry import Health, Identity, Instance, InstanceSpec, ModelIdentity, Registry, State
from services.common.load import Latency, LoadReport, Role
from services.common.config import ConfigError
from services.common.access import BearerAuth
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unauthenticated

STALE = 2.0


def instance(name: str, *, state=State.ACTIVE, health=Health.SERVING, load: LoadReport | None = LoadReport(),
             load_at: float | None = 0.0, in_flight=0, failures=0, role=Role.TARGET,
             identity=Identity.CONFIRMED) -> Instance:
    inst = Instance(InstanceSpec(id=name, address=f"127.0.0.1:{1000 + hash(name) % 1000}", role=role))
    inst.state, inst.health, inst.load, inst.identity = state, health, load, identity
    inst.in_flight, inst.consecutive_failures = in_flight, failures
    inst.load_at = load_at if load is not None else None
    return inst


def random_fleet(rng: random.Random, now: float) -> list[Instance]:
    fleet = []
    for k in range(rng.randint(0, 8)):
        has_load = rng.random() < 0.8
        fleet.append(instance(
            f"i{k}", state=rng.choice(list(State)), health=rng.choice(list(Health)),
            load=LoadReport(in_flight=rng.randint(0, 9), queue_length=rng.randint(0, 5),
                      accelerator_utilization=rng.random(), ttft=Latency(p50_ms=rng.uniform(0, 500))) if has_load else None,
            load_at=now - rng.uniform(0, 2 * STALE), in_flight=rng.randint(0, 5), failures=rng.randint(0, 3),
            identity=rng.choice([Identity.CONFIRMED, Identity.CONFIRMED, Identity.UNCHECKED, Identity.WRONG])))
    return fleet


def routable(inst: Instance, now: float) -> bool:
    return (inst.state is State.ACTIVE and inst.health is Health.SERVING and inst.load_at is not None
            and now - inst.load_at <= STALE and inst.identity is Identity.CONFIRMED)


@pytest.mark.parametrize("policy", list(PolicyName))
def test_never_chooses_unhealthy_draining_ejected_stale_or_excluded(policy):
    rng = random.Random(policy.value)
    now = 100.0
    for trial in range(500):
        fleet = random_fleet(rng, now)
        exclude = frozenset(i.id for i in fleet if rng.random() < 0.2)
        # Prefix affinity may be told that any instance (a bad one too) holds the prompt's prefix.
        affinity = {i.id: rng.randint(1, 4) for i in fleet if rng.random() < 0.5}
        chosen = choose(policy, fleet, Snapshot(now=now, stale_after_s=STALE, sequence=trial, exclude=exclude,
                                                seed=rng.getrandbits(64), affinity=affinity,
                                                max_imbalance=rng.randint(0, 3)))
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
    fleet = [instance("a", load=LoadReport(in_flight=5)), instance("b", load=LoadReport(in_flight=1), in_flight=3),
             instance("c", load=LoadReport(in_flight=2))]
    assert least_loaded(fleet, Snapshot(now=1.0)).id == "c"
    fleet[2].in_flight = 6
    assert least_loaded(fleet, Snapshot(now=1.0)).id == "b"


def test_least_loaded_ties_rotate():
    fleet = [instance(n) for n in "abc"]
    picks = {choose(PolicyName.LEAST_LOADED, fleet, Snapshot(now=1.0, sequence=s)).id for s in range(3)}
    assert picks == {"a", "b", "c"}


def test_least_loaded_ignores_stale_reports():
    fleet = [instance("a", load=LoadReport(in_flight=9), load_at=0.0), instance("b", load=LoadReport(in_flight=1), load_at=0.0)]
    assert choose(PolicyName.LEAST_LOADED, fleet, Snapshot(now=1.0, stale_after_s=STALE)).id == "b"
    fleet[1].load_at = -5.0  # stale: b is no longer routable at all
    assert choose(PolicyName.LEAST_LOADED, fleet, Snapshot(now=1.0, stale_after_s=STALE)).id == "a"


def test_score_weights_and_ranking():
    snap = Snapshot(now=1.0)
    idle = instance("idle", load=LoadReport(accelerator_utilization=0.0, queue_length=0, ttft=Latency(p50_ms=0.0)))
    assert score(idle, snap) == pytest.approx(1.0)
    busy = instance("busy", load=LoadReport(accelerator_utilization=1.0, queue_length=3, ttft=Latency(p50_ms=900.0)), failures=1)
    assert score(busy, snap) == pytest.approx(0.3 * 0 + 0.3 / 4 + 0.2 * 0.1 / 1.0 + 0.2 / 2)
    assert 0.0 <= score(busy, snap) < score(idle, snap) <= 1.0
    assert choose(PolicyName.SCORE, [busy, idle], snap).id == "idle"
    assert score(instance("down", health=Health.NOT_SERVING), snap) == 0.0


def test_score_weights_are_configurable_and_normalised():
    snap = Snapshot(now=1.0)
    cool_but_queued = instance("a", load=LoadReport(accelerator_utilization=0.0, queue_length=9, ttft=Latency(p50_ms=900.0)))
    hot_but_empty = instance("b", load=LoadReport(accelerator_utilization=1.0, queue_length=0, ttft=Latency(p50_ms=0.0)))
    assert choose(PolicyName.SCORE, [cool_but_queued, hot_but_empty], snap).id == "b"
    idle_only = Snapshot(now=1.0, weights=Weights(idle=2.0, queue=0.0, latency=0.0, availability=0.0))
    assert choose(PolicyName.SCORE, [cool_but_queued, hot_but_empty], idle_only).id == "a"
    assert score(cool_but_queued, idle_only) == pytest.approx(1.0) and score(hot_but_empty, idle_only) == 0.0
    c = RouterConfig.from_args(["--weight-idle", "1", "--weight-queue", "0", "--weight-latency", "0",
                                "--weight-availability", "0"], env={})
    assert (c.weight_idle, c.weight_queue) == (1.0, 0.0)
    with pytest.raises(ConfigError, match="weight"):
        RouterConfig.from_namespace({"weight_idle": 0, "weight_queue": 0, "weight_latency": 0,
                                     "weight_availability": 0}, env={})
    with pytest.raises(ConfigError, match="weight_queue"):
        RouterConfig.from_namespace({"weight_queue": -1}, env={})


def test_score_ties_are_broken_at_random():
    fleet = [instance(n) for n in "abcd"]
    picks = Counter(choose(PolicyName.SCORE, fleet, Snapshot(now=1.0, sequence=0, seed=s)).id for s in range(400))
    assert set(picks) == set("abcd") and min(picks.values()) > 50
    # The same seed, the same choice: the decision is a function of the snapshot.
    assert len({choose(PolicyName.SCORE, fleet, Snapshot(now=1.0, seed=42)).id for _ in range(10)}) == 1
    fleet[2].load = LoadReport(accelerator_utilization=0.5)  # no tie any more
    assert {choose(PolicyName.SCORE, fleet[2:], Snapshot(now=1.0, seed=s)).id for s in range(50)} == {"d"}


def test_power_of_two_never_picks_the_busier_of_its_pair():
    rng = random.Random(2)
    now = 50.0
    for trial in range(2000):
        fleet = [instance(f"i{k}", load=LoadReport(in_flight=rng.randint(0, 6)), load_at=now,
                          in_flight=rng.randint(0, 6)) for k in range(rng.randint(1, 7))]
        snap = Snapshot(now=now, seed=rng.getrandbits(64), sequence=trial)
        candidates = eligible(fleet, snap)
        drawn = pair(candidates, snap)
        chosen = power_of_two(candidates, snap)
        assert chosen in drawn and len(drawn) == min(2, len(fleet)) and len({i.id for i in drawn}) == len(drawn)
        assert all(load_of(chosen, snap) <= load_of(other, snap) for other in drawn)
        assert choose(PolicyName.POWER_OF_TWO, fleet, snap) is chosen


def test_power_of_two_spreads_an_even_load():
    fleet = [instance(n) for n in "abc"]
    picks = Counter(choose(PolicyName.POWER_OF_TWO, fleet, Snapshot(now=1.0, seed=s)).id for s in range(600))
    assert set(picks) == set("abc") and min(picks.values()) > 100


# -- prefix affinity --------------------------------------------------------
def test_prefix_blocks_chain_over_the_prefix():
    a = prefix_blocks(list(range(40)), 8)
    b = prefix_blocks(list(range(35)) + [99, 98, 97, 96, 95], 8)
    assert len(a) == 5 and a[:4] == b[:4] and a[4] != b[4]
    assert prefix_blocks([1, 2, 3], 8) == ()
    assert prefix_blocks([5] + list(range(39)), 8)[1:] != a[1:]  # a block's hash depends on what precedes it
    text = "You are a helpful assistant. " * 4
    assert prefix_blocks(text + "Hi", 4)[:7] == prefix_blocks(text + "Bye", 4)[:7] and len(prefix_blocks(text, 4)) == 7
    assert prefix_blocks("x" * 32, 8) != prefix_blocks([ord("x")] * 32, 8)


def test_prefix_table_matches_longest_prefix_and_is_bounded():
    table = PrefixTable(capacity=6)
    long = prefix_blocks(list(range(32)), 8)  # 4 blocks
    table.record(long[:2], "a")
    assert table.match(long) == {"a": 2}
    table.record(long, "b")  # b received the longer prompt after a: it holds every block now
    assert table.match(long) == {"b": 4}
    other = prefix_blocks([7] * 24, 8)
    table.record(other, "a")  # 4 + 3 blocks > 6: the least recently used goes
    assert len(table) == 6 and table.match(long) == {} and table.match(other) == {"a": 3}
    table.forget("a")
    assert table.match(other) == {} and len(table) == 3


def test_prefix_affinity_is_stable_while_load_is_balanced():
    rng = random.Random(5)
    now = 10.0
    for trial in range(200):
        fleet = [instance(f"i{k}") for k in range(rng.randint(2, 6))]
        bound = rng.randint(0, 4)
        table = PrefixTable(1000)
        system = [rng.randrange(300) for _ in range(32)]
        home = None
        for r in range(12):
            for inst in fleet:  # loads move, but stay within the bound of each other
                inst.load = LoadReport(in_flight=rng.randint(0, bound))
                inst.load_at = now
            prompt = system + [rng.randrange(300) for _ in range(rng.randint(0, 20))]
            blocks = prefix_blocks(prompt, 8)
            snap = Snapshot(now=now, sequence=trial * 100 + r, affinity=table.match(blocks), max_imbalance=bound)
            chosen = choose(PolicyName.PREFIX_AFFINITY, fleet, snap)
            table.record(blocks, chosen.id)
            if home is None:
                home = chosen
                assert load_of(chosen, snap) == min(load_of(i, snap) for i in fleet)  # new prefix: least loaded
            assert chosen is home


def test_prefix_affinity_leaves_an_overloaded_instance_and_prefers_longer_matches():
    fleet = [instance("a", load=LoadReport(in_flight=2)), instance("b", load=LoadReport(in_flight=0)),
             instance("c", load=LoadReport(in_flight=1))]
    assert choose(PolicyName.PREFIX_AFFINITY, fleet, Snapshot(now=1.0, affinity={"a": 3}, max_imbalance=2)).id == "a"
    assert choose(PolicyName.PREFIX_AFFINITY, fleet, Snapshot(now=1.0, affinity={"a": 3}, max_imbalance=1)).id == "b"
    assert choose(PolicyName.PREFIX_AFFINITY, fleet,
                  Snapshot(now=1.0, affinity={"a": 3, "c": 2}, max_imbalance=4)).id == "a"
    assert choose(PolicyName.PREFIX_AFFINITY, fleet,
                  Snapshot(now=1.0, affinity={"a": 2, "c": 2}, max_imbalance=4)).id == "c"  # equal: less loaded
    assert choose(PolicyName.PREFIX_AFFINITY, fleet, Snapshot(now=1.0)).id == "b"  # no prefix known: least loaded
    fleet[0].state = State.DRAINING  # a holder that may not take requests does not count
    assert choose(PolicyName.PREFIX_AFFINITY, fleet, Snapshot(now=1.0, affinity={"a": 3}, max_imbalance=9)).id == "b"


def test_every_policy_is_registered():
    assert set(POLICIES) == set(PolicyName)


# -- admission ----------------------------------------------------------------
def test_admission_goes_to_the_first_pool_with_room_then_refuses_with_a_hint():
    adm = Admission(default_bound=2, bounds={"bulk": 1})
    serving = {"fast", "bulk"}
    routable = serving.__contains__
    assert adm.admit(("fast", "bulk"), routable) == "fast"
    assert adm.admit(("fast", "bulk"), routable) == "fast"
    assert adm.admit(("fast", "bulk"), routable) == "bulk"  # fast is full: spill over
    with pytest.raises(ResourceExhausted) as err:
        adm.admit(("fast", "bulk"), routable)
    assert "'fast' (2/2)" in err.value.message and "'bulk' (1/1)" in err.value.message
    assert err.value.retry_after_s == pytest.approx(0.1)  # no request finished yet: the default
    assert adm.rejected == {"fast": 1}
    adm.release("fast", 0.8)
    adm.release("fast", 0.8)
    assert adm.in_flight["fast"] == 0
    adm.in_flight["fast"] = 2
    with pytest.raises(ResourceExhausted) as err:
        adm.admit(("fast",), routable)
    assert err.value.retry_after_s == pytest.approx(0.4)  # a slot frees every 0.8 s / 2 requests


def test_admission_skips_pools_that_cannot_serve():
    adm = Admission(default_bound=1)
    assert adm.admit(("down", "up"), {"up"}.__contains__) == "up"
    with pytest.raises(ResourceExhausted):
        adm.admit(("down", "up"), {"up"}.__contains__)
    # Nothing can serve: the request goes to its own pool, where routing says why not.
    assert adm.admit(("down", "gone"), lambda p: False) == "down"
    assert Admission().admit(("p",), lambda p: True) == "p" and Admission().bound("p") == 0
    adm.release("never-admitted")
    assert adm.in_flight["never-admitted"] == 0


# -- response cache -----------------------------------------------------------
def test_cache_lru_ttl_and_counts():
    cache = ResponseCache(capacity=2, ttl_s=10.0)
    assert cache.get("a", 0.0) is None
    cache.put("a", 1, now=0.0)
    cache.put("b", 2, now=1.0)
    assert cache.get("a", 2.0) == 1  # a is now the most recently used
    cache.put("c", 3, now=3.0)
    assert cache.get("b", 3.0) is None and cache.get("a", 3.0) == 1 and cache.get("c", 3.0) == 3
    assert cache.evictions == 1 and len(cache) == 2
    assert cache.get("a", 10.0) is None and len(cache) == 1  # expired at 0 + 10 s
    assert cache.get("c", 12.9) == 3 and cache.get("c", 13.0) is None
    assert (cache.hits, cache.misses) == (4, 4)


# -- authentication -------------------------------------------------------------
def test_bearer_auth():
    auth = BearerAuth("s3cret")
    auth.check([("x-other", "1"), ("authorization", "Bearer s3cret")])
    auth.check([("authorization", "bearer  s3cret ")])
    for metadata in (None, [], [("authorization", "Bearer wrong")], [("authorization", "s3cret")],
                     [("authorization", "Basic s3cret")], [("authorization", "Bearer ")]):
        with pytest.raises(Unauthenticated):
            auth.check(metadata)


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
    reg.set_identity("a", ModelIdentity(Role.TARGET))
    reg.record_load("a", LoadReport(), now=0.0)
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
    reg.record_success("a")  # a request begun before the ejection succeeds during it
    assert inst.consecutive_failures == 0
    assert inst.describe(7.0, STALE) == "a ejected after 3 consecutive failures"  # what ejected it, not 0


def test_an_instance_that_keeps_cutting_calls_off_while_serving_is_ejected():
    """One cut-off call (CANCELLED) is retried, not counted; a run of them with no success between (twice the
    failures that eject) ejects the instance, which said SERVING all along."""
    reg = Registry(eject_after_failures=2, eject_for_s=5.0)
    inst, _ = reg.upsert(InstanceSpec("a", "h:1"))
    reg.set_health("a", Health.SERVING)
    reg.set_identity("a", ModelIdentity(Role.TARGET))
    reg.record_load("a", LoadReport(), now=0.0)
    for _ in range(3):
        reg.record_cut_off("a", now=1.0)
    reg.record_success("a")
    for _ in range(3):
        reg.record_cut_off("a", now=2.0)
    assert inst.routable(2.0, STALE)  # a success between: no run of four
    reg.record_cut_off("a", now=2.0)
    assert inst.state is State.EJECTED
    assert inst.describe(2.0, STALE) == "a ejected after 4 calls cut off (CANCELLED) in a row"
    assert reg.readmit(now=7.0) == [inst]


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
    ("CANCELLED", 0, 1, Outcome.RETRY),  # cut off on the instance's side: worth another instance
    ("CANCELLED", 4, 2, Outcome.RESUME),
    ("RESOURCE_EXHAUSTED", 4, 1, Outcome.FAIL),
    ("UNAVAILABLE", 4, 3, Outcome.FAIL),
    # The instance's faults beyond the transport's: the wrong kind of server, its refusal, its state.
    ("UNIMPLEMENTED", 0, 1, Outcome.RETRY),
    ("PERMISSION_DENIED", 0, 1, Outcome.RETRY),
    ("FAILED_PRECONDITION", 0, 1, Outcome.RETRY),
    ("UNIMPLEMENTED", 4, 1, Outcome.RESUME),
    ("NOT_FOUND", 0, 1, Outcome.FAIL),
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
    assert RouterConfig.from_namespace({}, env={}).policy is PolicyName.SCORE  # the default


def test_config_pools_spillover_and_limits():
    c = RouterConfig.from_args(["--targets", "fast@127.0.0.1:1,127.0.0.1:2", "--pools", "interactive=fast,batch=bulk",
                                "--spillover", "batch->main,interactive->main,Batch->fast,batch->main",
                                "--pool-limits", "fast=4", "--pool-max-in-flight", "16"],
                               env={"LLMESH_ROUTER_POOL": "main"})
    assert c.priority_pools() == {"batch": "bulk", "normal": "main", "interactive": "fast"}
    assert c.spillover_map() == {"batch": ("main", "fast"), "interactive": ("main",)}
    assert c.pool_bounds() == {"fast": 4} and c.pool_max_in_flight == 16
    assert RouterConfig.from_namespace({}, env={"LLMESH_ROUTER_AUTH_TOKEN": "s3cret"}).auth_token == "s3cret"
    assert RouterConfig.from_namespace({}, env={}).cache_size == 0  # the cache is opt-in
    for bad, field in ((["--pools", "urgent=fast"], "pools"), (["--pools", "batch"], "pools"),
                       (["--spillover", "batch=>x"], "spillover"), (["--spillover", "bulk->x"], "spillover"),
                       (["--spillover", "normal->default"], "spillover"),
                       (["--pool-limits", "fast=-1"], "pool_limits"), (["--targets", "@127.0.0.1:1"], "targets"),
                       (["--targets", "fast@nope"], "targets"), (["--cache-size", "-1"], "cache_size"),
                       (["--cache-ttl-s", "0"], "cache_ttl_s"), (["--affinity-block", "0"], "affinity_block")):
        with pytest.raises(ConfigError, match=field):
            RouterConfig.from_args(bad, env={})
