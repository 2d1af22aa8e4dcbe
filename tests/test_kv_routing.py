"""KV events from a real engine into the router's index: consistent across
evictions and restarts; the kv_aware policy routes to the holder unless its
load outweighs the prefill it saves."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from router.config import PolicyName
from router.kv_index import KvIndex
from router.policy import Snapshot, choose, kv_aware, kv_cost
from services.common.block_hash import block_hashes
from services.common.stats_service import StatsServicer
from services.common.status import ErrorInterceptor
from services.common.stubs import stats_pb2, stats_pb2_grpc
from services.engine.kv_events import KVEventLog
from tests.test_prefix_cache import PREFIX, engine_with, run
from tests.test_router_policy import instance


def follow(index: KvIndex, log: KVEventLog, cursor, instance_id="t1"):
    """What the router's watcher does with one KvEvents message."""
    batch = log.read(cursor)
    if not batch.empty:
        index.apply(instance_id, batch.snapshot, batch.stored, batch.removed, log.block_size)
    return batch.cursor


def test_the_index_follows_the_engine_across_evictions_and_a_restart(tiny_models):
    # 10 usable blocks of 4: a few prompts of 21+ tokens evict each other's blocks.
    engine = engine_with(tiny_models, num_kv_blocks=11)
    index, cursor = KvIndex(), None
    prompts = [[p + k for p in PREFIX] for k in range(4)] + [PREFIX]
    for p in prompts:
        run(engine, [p], 3, together=False)
        cursor = follow(index, engine.kv_events, cursor)
        assert index.held("t1") == set(engine.scheduler.kv.cached)  # what is cached, no more, no less
    assert engine.kv_events.read(None).snapshot  # evictions happened: the first prompts' blocks are gone
    cached = index.cached_tokens(["t1", "other"], PREFIX + [1, 2])
    assert cached == {"t1": 20, "other": 0}  # the last prompt's 5 blocks are held
    # The target restarts: a new engine, a new log; the reconnecting watcher gets a snapshot.
    restarted = engine_with(tiny_models, num_kv_blocks=11)
    cursor = follow(index, restarted.kv_events, None)
    assert index.held("t1") == set() and index.cached_tokens(["t1"], PREFIX + [1]) == {"t1": 0}
    run(restarted, [PREFIX + [9]], 2, together=False)
    follow(index, restarted.kv_events, cursor)
    assert index.cached_tokens(["t1"], PREFIX + [1]) == {"t1": 20}


def test_a_subscriber_that_falls_behind_gets_a_snapshot():
    log = KVEventLog(block_size=4, capacity=2)
    from services.engine.block_manager import KVEvent
    first = log.read(None)
    assert first.snapshot and first.stored == ()
    log.append([KVEvent(stored=(1, 2)), KVEvent(removed=(1,)), KVEvent(stored=(3,))])
    late = log.read(first.cursor)  # 3 events since, 2 kept: the log cannot replay them
    assert late.snapshot and set(late.stored) == {2, 3}
    log.append([KVEvent(stored=(4,)), KVEvent(removed=(4, 2))])
    delta = log.read(late.cursor)
    assert not delta.snapshot and delta.stored == () and set(delta.removed) == {2, 4}
    assert log.read(delta.cursor).empty


def test_changes_before_a_snapshot_are_ignored_and_forget_clears():
    index = KvIndex()
    index.apply("a", False, [1, 2], [], 4)
    assert "a" not in index
    index.apply("a", True, [1, 2], [], 4)
    index.apply("a", False, [3], [1], 4)
    assert index.held("a") == {2, 3}
    index.forget("a")
    assert "a" not in index and index.held("a") == frozenset()


def test_the_index_predicts_exactly_the_blocks_the_target_reuses():
    """At most (len - 1) // block_size blocks: one token is always computed."""
    prompt = list(range(100, 116))  # exactly 4 blocks of 4
    index = KvIndex()
    index.apply("a", True, block_hashes(prompt, 4), [], 4)
    assert index.cached_tokens(["a"], prompt) == {"a": 12}
    assert index.cached_tokens(["a"], prompt + [7]) == {"a": 16}
    assert index.cached_tokens(["a"], [0] + prompt) == {"a": 0}  # a different first block: no chain


def test_kv_aware_picks_the_holder_unless_its_load_outweighs_the_saving():
    prompt = PREFIX * 5  # 105 tokens
    index = KvIndex()
    index.apply("holder", True, block_hashes(prompt, 4), [], 4)
    fleet = [instance("holder", in_flight=1), instance("idle"), instance("busy", in_flight=5)]
    prefill = {iid: len(prompt) - hit for iid, hit in index.cached_tokens([i.id for i in fleet], prompt).items()}
    snap = Snapshot(now=1.0, prefill_tokens=prefill, kv_load_weight=16.0)
    assert choose(PolicyName.KV_AWARE, fleet, snap).id == "holder"  # 1 + 16 x 1 < 105 + 0
    assert kv_cost(fleet[0], snap) == 1 + 16.0
    heavy = Snapshot(now=1.0, prefill_tokens=prefill, kv_load_weight=200.0)
    assert choose(PolicyName.KV_AWARE, fleet, heavy).id == "idle"  # 1 + 200 > 105
    # No events at all: the least loaded, ties rotating with the request's ordinal.
    picks = {kv_aware([instance("a"), instance("b")], Snapshot(now=1.0, sequence=s)).id for s in range(4)}
    assert picks == {"a", "b"}


async def test_watch_kv_events_streams_a_snapshot_then_changes(tiny_models):
    engine = engine_with(tiny_models)
    run(engine, [PREFIX], 2, together=False)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])  # as every llmesh server has
    stats_pb2_grpc.add_StatsServicer_to_server(
        StatsServicer(lambda: stats_pb2.LoadReport(), 1.0, kv_events=engine.kv_events), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = stats_pb2_grpc.StatsStub(channel)
            call = stub.WatchKvEvents(stats_pb2.WatchKvEventsRequest(interval_s=0.01))
            first = await call.read()
            assert first.snapshot and set(first.stored) == set(engine.scheduler.kv.cached)
            assert first.block_size == 4
            run(engine, [[p + 1 for p in PREFIX]], 2, together=False)
            second = await asyncio.wait_for(call.read(), 5)
            assert not second.snapshot and set(second.stored) == set(engine.scheduler.kv.cached) - set(first.stored)
            call.cancel()
            bad = stub.WatchKvEvents(stats_pb2.WatchKvEventsRequest(interval_s=100))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bad.read()
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        none = grpc.aio.server()
        stats_pb2_grpc.add_StatsServicer_to_server(StatsServicer(lambda: stats_pb2.LoadReport(), 1.0), none)
        port2 = none.add_insecure_port("127.0.0.1:0")
        await none.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port2}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stats_pb2_grpc.StatsStub(channel).WatchKvEvents(stats_pb2.WatchKvEventsRequest()).read()
            assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
        await none.stop(None)
    finally:
        await server.stop(None)


def test_a_routed_prompt_counts_as_held_while_in_flight_then_until_its_events_come_or_it_expires():
    prompt = PREFIX * 2  # 42 tokens: 10 usable blocks of 4
    index = KvIndex(expect_s=2.0, pending_s=100.0)
    index.apply("a", True, [], [], 4)
    hashes = index.expect("a", prompt, now=10.0)
    assert len(hashes) == 10
    assert index.cached_tokens(["a"], prompt, now=11.0) == {"a": 40}  # a burst's next request follows it
    # Still queued on the instance long after: still expected there.
    assert index.cached_tokens(["a"], prompt, now=60.0) == {"a": 40}
    index.settle("a", hashes, now=60.0)
    assert index.cached_tokens(["a"], prompt, now=61.0) == {"a": 40}  # a grace for its events
    assert index.cached_tokens(["a"], prompt, now=62.5) == {"a": 0}  # no events confirmed it: expired
    # A request in flight past pending_s stops counting (a lost settle cannot pin a prefix forever).
    index.expect("a", prompt, now=200.0)
    assert index.cached_tokens(["a"], prompt, now=301.0) == {"a": 0}
    index.expect("unknown", prompt, now=10.0)  # no snapshot yet: nothing expected
    assert index.expect("unknown", prompt, now=10.0) == ()
    assert index.cached_tokens(["unknown"], prompt, now=10.5) == {"unknown": 0}


def test_two_requests_expecting_a_prefix_keep_it_until_both_end_and_events_replace_the_expectation():
    prompt = PREFIX * 2
    index = KvIndex(expect_s=2.0)
    index.apply("a", True, [], [], 4)
    first, second = index.expect("a", prompt, now=0.0), index.expect("a", prompt, now=0.5)
    index.settle("a", first, now=1.0)
    assert index.cached_tokens(["a"], prompt, now=50.0) == {"a": 40}  # the second is still in flight
    # Its events report the blocks stored: held; once evicted, no expectation props them up.
    index.apply("a", False, list(first), [], 4)
    index.apply("a", False, [], list(first[5:]), 4)
    assert index.cached_tokens(["a"], prompt, now=50.0) == {"a": 20}
    index.settle("a", second, now=51.0)
    assert index.cached_tokens(["a"], prompt, now=51.5) == {"a": 20}


def test_the_router_tokenizes_text_prompts_as_the_target_does(tiny_models):
    from transformers import AutoTokenizer

    from router.tokenizer import load_tokenizer
    target, router = AutoTokenizer.from_pretrained(str(tiny_models.target)), load_tokenizer(str(tiny_models.target))
    for text in ["The meaning of life is", "  spaced\ttext, ünïcode — and 123 numbers!\n\nnew para"]:
        assert router.encode(text, add_special_tokens=False).ids == target.encode(text, add_special_tokens=False)


async def _hits(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        call = stats_pb2_grpc.StatsStub(channel).Watch(stats_pb2.WatchStatsRequest())
        report = await call.read()
        call.cancel()
    return report.prefix_cache_hits_total


async def test_kv_aware_routes_each_group_to_the_target_holding_its_prefix(tiny_models, reference_model):
    """Two real targets behind a kv_aware router: after each group's first request,
    the rest of the group (sent together, interleaved) follows its prefix and hits
    the cache there, and the tokens are those of the model."""
    from tests.conftest import hf_greedy
    from tests.router_helpers import collect, request, running_router, start_target, wait_routable

    group_a = [(7 * i) % 250 + 5 for i in range(40)]
    group_b = [(13 * i) % 250 + 5 for i in range(40)]
    apps = [await start_target(tiny_models, block_size=4) for _ in range(2)]
    try:
        # Prompts of 40 tokens save at most 40 prefill tokens: a small load weight
        # lets the saving outweigh a few requests in flight, as ~1,000-token prefixes do at 256.
        async with running_router([a.address for a in apps], policy="kv_aware", kv_load_weight=4) as (_, stub, _):
            await wait_routable(stub, [a.address for a in apps])
            _, first_a = await collect(stub, request(group_a + [1], max_new_tokens=4))
            _, first_b = await collect(stub, request(group_b + [1], max_new_tokens=4))
            holder = {"a": first_a[-1].instance_id, "b": first_b[-1].instance_id}
            assert holder["a"] != holder["b"]  # idle and cold: the tie rotates
            hits_before = {a.address: await _hits(a.address) for a in apps}
            prompts = [(g, (group_a if g == "a" else group_b) + [2 + k]) for k in range(3) for g in "ab"]
            results = await asyncio.gather(*(collect(stub, request(p, max_new_tokens=6)) for _, p in prompts))
            for (group, prompt), (tokens, chunks) in zip(prompts, results):
                assert chunks[-1].instance_id == holder[group], (group, [c.instance_id for c in chunks])
                assert tokens == hf_greedy(reference_model, prompt, 6)
            for a in apps:  # every later request reused its group's 10 cached blocks
                assert await _hits(a.address) - hits_before[a.address] == 3 * 40
    finally:
        for a in apps:
            await a.stop(0)


def test_kv_aware_counts_the_prefill_queued_on_an_instance_in_tokens():
    # Both hold nothing of this prompt and have two requests in flight, but a's are
    # cold 1,000-token prompts not yet prefilled while b's were cache hits: b is cheaper.
    a, b = instance("a", in_flight=2), instance("b", in_flight=2)
    snap = Snapshot(now=1.0, prefill_tokens={"a": 500, "b": 500}, queued_prefill={"a": 2000, "b": 30},
                    kv_queue_weight=1.0)
    assert kv_aware([a, b], snap).id == "b"
    assert kv_cost(a, snap) == 500 + 2000 + 256 * 2


def test_the_router_counts_a_routed_prompt_as_queued_prefill_until_its_first_token():
    from router.config import RouterConfig
    from router.registry import Health, Identity, InstanceSpec, Role
    from router.upstreams import Upstreams
    from services.common.stubs import stats_pb2

    up = Upstreams(RouterConfig.from_namespace({"port": 0, "http_port": 0, "policy": "kv_aware",
                                                "kv_queue_weight": 1.0}, env={}),
                   clock=lambda: 1.0)
    for name in ("a", "b"):
        inst, _ = up.registry.upsert(InstanceSpec(id=name, address=f"127.0.0.1:{len(name)}", role=Role.TARGET))
        inst.health, inst.identity = Health.SERVING, Identity.CONFIRMED
        inst.load, inst.load_at = stats_pb2.LoadReport(), 1.0
        up.kv_index.apply(name, True, [], [], 4)
    prompt = tuple(PREFIX * 2)  # 42 tokens, 40 cacheable
    first = up.choose(Role.TARGET, ["default"], 0, prefix=prompt)
    # The first request's 42 tokens are queued there: a cold prompt goes to the other...
    # (sequence 2 breaks a tie toward the first, as sequence 0 did)
    other = up.choose(Role.TARGET, ["default"], 2, prefix=tuple(range(3, 45)))
    assert other.id != first.id
    # ...while the same prefix follows the first (its 40 expected tokens outweigh the queue).
    assert up.choose(Role.TARGET, ["default"], 4, prefix=prompt).id == first.id
    assert up._queued_prefill == {first.id: 42 + 2, other.id: 42}
    up.prefilled(first.id, 0)
    up.finished(first.id, 4)  # ended before its first token: no longer queued either
    up.finished(other.id, 2)
    assert up._queued_prefill == {}
    up.finished(first.id, 0)  # the end after the first token changes nothing more
    assert up._queued_prefill == {}


def test_with_the_queue_weight_off_the_router_keeps_no_queued_prefill():
    from router.config import RouterConfig
    from router.registry import Health, Identity, InstanceSpec, Role
    from router.upstreams import Upstreams
    from services.common.stubs import stats_pb2

    up = Upstreams(RouterConfig.from_namespace({"port": 0, "http_port": 0, "policy": "kv_aware"}, env={}),
                   clock=lambda: 1.0)
    inst, _ = up.registry.upsert(InstanceSpec(id="a", address="127.0.0.1:1", role=Role.TARGET))
    inst.health, inst.identity, inst.load, inst.load_at = Health.SERVING, Identity.CONFIRMED, stats_pb2.LoadReport(), 1.0
    up.kv_index.apply("a", True, [], [], 4)
    assert up.choose(Role.TARGET, ["default"], 0, prefix=tuple(PREFIX * 2)).id == "a"
    assert up._queued_prefill == {} and up._queued_of == {}
    up.finished("a", 0)
