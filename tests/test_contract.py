"""The contract, field by field: each test asserts what the comments of
protos/llmesh/v1/*.proto promise for fields no other test exercises, on
in-process servers (port 0) with the tiny models. Grouped by proto file; each
docstring names the fields it covers."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest

from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2, model_pb2_grpc, stats_pb2, stats_pb2_grpc
from services.draft.config import DraftConfig
from services.draft.main import create_server as create_draft
from services.target.config import TargetConfig
from services.target.main import create_server as create_target
from tests.helpers import Conversation


@pytest.fixture(scope="module")
async def draft(tiny_models):
    app = create_draft(DraftConfig.from_namespace({"model": str(tiny_models.draft), "port": 0}, env={}))
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    yield app, model_pb2_grpc.DraftModelStub(channel)
    await channel.close()
    await app.stop(0)


@pytest.fixture(scope="module")
async def target(tiny_models, draft):
    draft_app, _ = draft
    app = create_target(TargetConfig.from_namespace({
        "model": str(tiny_models.target), "port": 0, "draft_address": draft_app.address,
        "speculation_min_acceptance": 0.0, "draft_timeout_ms": 5000.0,
        "speculative_disable_by_batch_size": 64}, env={}))
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    yield app, model_pb2_grpc.TargetModelStub(channel), stats_pb2_grpc.StatsStub(channel)
    await channel.close()
    await app.stop(0)


def request(ids, n, spec=None, **sampling) -> gen.GenerateRequest:
    req = gen.GenerateRequest(prompt=gen.Prompt(tokens=gen.TokenIds(ids=ids)),
                              sampling=gen.SamplingParams(max_new_tokens=n, ignore_eos=True, **sampling))
    if spec is not None:
        req.speculation.enabled = spec
    return req


async def chunks_of(stub, req):
    return [c async for c in stub.Generate(req)]


# --- generation.proto ------------------------------------------------------


async def test_a_plain_stream_reports_usage_timing_and_instance(target):
    """GenerateChunk.usage (Usage.prompt_tokens, Usage.completion_tokens so far,
    on every chunk), GenerateChunk.timing (Timing.queue_ms, ttft_ms, tpot_ms,
    elapsed_ms, on the last chunk), GenerateChunk.instance_id (the target's
    GetInfo id), GenerateChunk.request_id (assigned when empty),
    GenerateChunk.finish_reason (LENGTH only on the last chunk)."""
    _, stub, _ = target
    info = await stub.GetInfo(model_pb2.GetInfoRequest())
    prompt = [5, 17, 42, 99]
    chunks = await chunks_of(stub, request(prompt, 12, spec=False))
    seen = 0
    for c in chunks:
        seen += len(c.token_ids)
        assert c.usage.prompt_tokens == len(prompt)
        assert c.usage.completion_tokens == seen
        assert c.instance_id == info.instance_id and c.instance_id
        assert c.request_id == chunks[0].request_id and c.request_id
    assert seen == 12
    assert all(c.finish_reason == gen.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == gen.FINISH_REASON_LENGTH
    t = last.timing
    assert 0 <= t.queue_ms <= t.ttft_ms <= t.elapsed_ms
    assert t.tpot_ms > 0
    # ttft + 11 more tokens at the mean tpot is the last token's time, within arrival..finish.
    assert t.ttft_ms + 11 * t.tpot_ms <= t.elapsed_ms * 1.0001


async def test_a_speculative_stream_reports_where_the_rounds_time_went(target):
    """SpeculationStats.draft_wait_ms, draft_compute_ms, verify_ms (summed over
    rounds; the draft's compute is part of the target's wait for it),
    SpeculationStats.rounds, proposed_tokens, accepted_tokens,
    accepted_per_position, mean_accepted_length, draft_timeouts,
    rounds_dropped_by_batch_size (0: a lone request never grows the batch)."""
    _, stub, _ = target
    chunks = await chunks_of(stub, request([5, 17, 42], 24, spec=True))
    s = chunks[-1].speculation
    assert s.rounds > 0 and s.proposed_tokens > 0
    assert s.draft_compute_ms > 0 and s.verify_ms > 0
    assert s.draft_wait_ms >= s.draft_compute_ms
    assert 0 <= s.accepted_tokens <= s.proposed_tokens
    assert sum(s.accepted_per_position) == s.accepted_tokens
    assert s.mean_accepted_length == pytest.approx((s.accepted_tokens + s.rounds) / s.rounds, rel=0.2)
    assert s.draft_timeouts == 0 and s.rounds_dropped_by_batch_size == 0
    assert s.disabled_reason == ""


# --- model.proto -----------------------------------------------------------


async def test_get_info_describes_the_loaded_model(target, draft, tiny_models):
    """ModelInfo.model_name (the directory's name), model_path, vocab_size,
    max_context, eos_token_ids, num_parameters, dtype, device, role,
    tokenizer_hash (equal for a draft and target with the same tokenizer),
    weight_layout ("plain", "packed" or "both, packed from N rows"), on
    both TargetModel.GetInfo and DraftModel.GetInfo."""
    _, tstub, _ = target
    _, dstub = draft
    for stub, path, role in ((tstub, tiny_models.target, stats_pb2.ROLE_TARGET),
                             (dstub, tiny_models.draft, stats_pb2.ROLE_DRAFT)):
        info = await stub.GetInfo(model_pb2.GetInfoRequest())
        assert info.role == role
        assert info.model_name == path.name
        assert info.model_path.rstrip("/").endswith(str(path).rstrip("/"))
        assert info.vocab_size == tiny_models.vocab_size
        assert info.max_context == tiny_models.max_context
        assert list(info.eos_token_ids) == [tiny_models.tokenizer.eos_token_id]
        assert info.dtype == "float32" and info.device == "cpu"
        assert info.num_parameters > 0
        assert re.fullmatch(r"plain|packed|both, packed from [1-9][0-9]* rows", info.weight_layout), info.weight_layout
    t = await tstub.GetInfo(model_pb2.GetInfoRequest())
    d = await dstub.GetInfo(model_pb2.GetInfoRequest())
    assert t.num_parameters > d.num_parameters
    assert t.tokenizer_hash and t.tokenizer_hash == d.tokenizer_hash


async def test_a_draft_reports_its_compute_time_per_round(draft):
    """ProposeResponse.compute_ms (milliseconds the draft spent on the round),
    ProposeResponse.tokens (gamma of them)."""
    _, stub = draft
    conv = Conversation(stub)
    try:
        r = await conv.round(append_tokens=[3, 4, 5, 6], gamma=4)
        assert len(r.tokens) == 4 and r.compute_ms > 0
        r = await conv.round(append_tokens=[7], discard=4, gamma=2)
        assert len(r.tokens) == 2 and r.compute_ms > 0
    finally:
        await conv.close()


async def test_configured_speculation_default_and_gamma_bounds_govern_requests(target):
    """ConfigureRequest.speculation_default / EngineSettings.speculation_default
    (requests that do not say speculate or not as it says),
    ConfigureRequest.gamma, gamma_min, gamma_max / EngineSettings (an adaptive
    request proposes within [gamma_min, gamma_max]: pinned all to 2, every
    round proposes at most 2), ConfigureResponse.settings, ModelInfo.settings."""
    _, stub, _ = target
    before = (await stub.GetInfo(model_pb2.GetInfoRequest())).settings
    try:
        reply = await stub.Configure(model_pb2.ConfigureRequest(speculation_default=True, gamma_min=2, gamma=2,
                                                                gamma_max=2))
        assert reply.settings.speculation_default
        assert (reply.settings.gamma_min, reply.settings.gamma, reply.settings.gamma_max) == (2, 2, 2)
        info = await stub.GetInfo(model_pb2.GetInfoRequest())
        assert info.settings == reply.settings
        s = (await chunks_of(stub, request([5, 17, 42], 20)))[-1].speculation
        assert s.rounds > 0
        assert s.proposed_tokens <= 2 * s.rounds
        assert len(s.accepted_per_position) <= 2
        await stub.Configure(model_pb2.ConfigureRequest(speculation_default=False))
        s = (await chunks_of(stub, request([5, 17, 42], 20)))[-1].speculation
        assert s.rounds == 0
        # A request that says so still speculates.
        s = (await chunks_of(stub, request([5, 17, 42], 20, spec=True)))[-1].speculation
        assert s.rounds > 0
    finally:
        await stub.Configure(model_pb2.ConfigureRequest(
            speculation_default=before.speculation_default, gamma_min=before.gamma_min, gamma=before.gamma,
            gamma_max=before.gamma_max))


# --- stats.proto -----------------------------------------------------------


async def next_report(call, condition, what):
    """The first report of a Watch stream that satisfies ``condition`` (bounded by reports, not time)."""
    for _ in range(400):
        report = await call.read()
        if condition(report):
            return report
    raise AssertionError(f"no report with {what} in 400 reports")


async def test_a_targets_load_report_counts_what_it_served(target):
    """LoadReport.requests_total, tokens_generated_total, rejected_total (a
    request refused by a full queue), proposed_tokens_total,
    accepted_tokens_total, speculation_rounds_total (equal to the request's own
    SpeculationStats), steps_total; LoadReport.tpot, ttft, e2e, queue_time
    (samples behind them); kv_cache_used_tokens <= kv_cache_capacity_tokens and
    kv_cache_usage their ratio; batch_fill = mean_batch_size / max_batch_size;
    token_efficiency in (0, 1]; timestamp, window_s, role, instance_id."""
    _, stub, stats = target
    info = await stub.GetInfo(model_pb2.GetInfoRequest())
    call = stats.Watch(stats_pb2.WatchStatsRequest(interval_s=0.05))
    try:
        before = await call.read()
        await stub.Configure(model_pb2.ConfigureRequest(max_queue=0))
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await chunks_of(stub, request([1, 2, 3], 4, spec=False))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await stub.Configure(model_pb2.ConfigureRequest(max_queue=info.settings.max_queue))
        s = (await chunks_of(stub, request([5, 17, 42], 16, spec=True)))[-1].speculation
        assert s.rounds > 0
        r = await next_report(call, lambda r: r.requests_total >= before.requests_total + 1
                              and r.rejected_total >= before.rejected_total + 1, "the request and the refusal")
        assert r.instance_id == info.instance_id and r.role == stats_pb2.ROLE_TARGET
        assert r.timestamp >= before.timestamp and r.window_s > 0
        assert r.requests_total - before.requests_total == 1
        assert r.rejected_total - before.rejected_total == 1
        assert r.tokens_generated_total - before.tokens_generated_total == 16
        assert r.speculation_rounds_total - before.speculation_rounds_total == s.rounds
        assert r.proposed_tokens_total - before.proposed_tokens_total == s.proposed_tokens
        assert r.accepted_tokens_total - before.accepted_tokens_total == s.accepted_tokens
        assert r.steps_total > before.steps_total
        for summary in (r.ttft, r.tpot, r.e2e, r.queue_time):
            assert summary.count >= 1
            assert 0 <= summary.p50_ms <= summary.p95_ms <= summary.p99_ms
        assert r.tpot.mean_ms > 0
        assert r.kv_cache_capacity_tokens > 0 and 0 <= r.kv_cache_used_tokens <= r.kv_cache_capacity_tokens
        assert r.kv_cache_usage == pytest.approx(r.kv_cache_used_tokens / r.kv_cache_capacity_tokens)
        assert r.mean_batch_size > 0
        assert r.batch_fill == pytest.approx(r.mean_batch_size / r.max_batch_size)
        assert 0 < r.token_efficiency <= 1
    finally:
        call.cancel()


# --- router.proto ----------------------------------------------------------


async def test_the_router_lists_labels_pools_priorities_and_cache_evictions(target):
    """InstanceSpec.labels (kept and listed), InstanceStatus.problem ("" while
    routable, "draining" once drained), InstanceStatus.state,
    ListInstancesRequest.role and .pool (filters), PoolAdmission.priorities
    (the classes whose requests go to the pool first), PoolAdmission.in_flight
    and max_in_flight (0: no bound), RouterStats.cache_evictions (answers
    dropped for the size bound), cache_entries, cache_capacity, in_flight;
    CompleteResponse.instance_id (the id the router registered the instance
    under), usage, timing, finish_reason, cached; Router.DrainInstance."""
    from tests.router_helpers import running_router, wait_routable
    from services.common.stubs import router_pb2

    app, _, _ = target
    async with running_router(cache_size=2, pools=["batch=bulk"]) as (_, stub, _):
        await stub.RegisterInstance(router_pb2.RegisterInstanceRequest(instance=router_pb2.InstanceSpec(
            id="t1", address=app.address, role=stats_pb2.ROLE_TARGET, labels={"rack": "a", "zone": "z"})))
        await wait_routable(stub, ["t1"])
        replies = [await stub.Complete(request([9, 8, i], 3, spec=False)) for i in range(3)]
        for r in replies:
            assert r.instance_id == "t1" and not r.cached
            assert r.finish_reason == gen.FINISH_REASON_LENGTH and len(r.token_ids) == 3
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 3)
            assert 0 < r.timing.ttft_ms <= r.timing.elapsed_ms
        again = await stub.Complete(request([9, 8, 2], 3, spec=False))
        assert again.cached and list(again.token_ids) == list(replies[2].token_ids)
        listed = await stub.ListInstances(router_pb2.ListInstancesRequest())
        stats = listed.router
        assert (stats.cache_capacity, stats.cache_entries, stats.cache_evictions) == (2, 2, 1)
        assert (stats.cache_hits, stats.cache_misses) == (1, 3)
        assert stats.in_flight == 0
        pools = {p.pool: p for p in stats.pools}
        assert set(pools) == {"bulk", "default"}
        assert list(pools["bulk"].priorities) == [gen.PRIORITY_BATCH]
        assert sorted(pools["default"].priorities) == [gen.PRIORITY_NORMAL, gen.PRIORITY_INTERACTIVE]
        assert all(p.in_flight == 0 and p.max_in_flight == 0 for p in pools.values())
        (inst,) = listed.instances
        assert dict(inst.spec.labels) == {"rack": "a", "zone": "z"} and inst.spec.pool == "default"
        assert inst.problem == "" and inst.state == router_pb2.INSTANCE_STATE_ACTIVE
        for req, ids in ((router_pb2.ListInstancesRequest(role=stats_pb2.ROLE_DRAFT), []),
                         (router_pb2.ListInstancesRequest(role=stats_pb2.ROLE_TARGET), ["t1"]),
                         (router_pb2.ListInstancesRequest(pool="bulk"), []),
                         (router_pb2.ListInstancesRequest(pool="default"), ["t1"])):
            assert [i.spec.id for i in (await stub.ListInstances(req)).instances] == ids
        drained = (await stub.DrainInstance(router_pb2.DrainInstanceRequest(id="t1"))).instance
        assert drained.state == router_pb2.INSTANCE_STATE_DRAINING and "draining" in drained.problem


# --- monitor.proto ---------------------------------------------------------

from tests.test_monitor_service import fake_router, instances, monitor  # noqa: E402,F401  (fixtures)


async def test_the_monitor_reports_time_per_output_token(fake_router, instances, monitor):  # noqa: F811
    """ThroughputMetrics.tpot (from LoadReport.tpot: per instance as reported,
    merged over a pool: p50 and mean count-weighted, p95/p99 the worst,
    count summed), GetThroughputResponse.per_instance, Scope.pool."""
    from services.common.stubs import monitor_pb2

    a = await instances("target-a", tokens_per_s=100, requests_per_s=10, tpot=stats_pb2.LatencySummary(
        p50_ms=10, p95_ms=30, p99_ms=50, mean_ms=12, count=30))
    b = await instances("target-b", tokens_per_s=100, requests_per_s=10, tpot=stats_pb2.LatencySummary(
        p50_ms=20, p95_ms=25, p99_ms=60, mean_ms=22, count=10))
    fake_router.add("a", a.address, pool="p")
    fake_router.add("b", b.address, pool="p")
    mon = await monitor(fake_router.address)

    async def both():
        try:
            reply = await mon.throughput(window_s=1.0, pool="p")
        except grpc.aio.AioRpcError as err:  # NOT_FOUND until the monitor has discovered the pool
            assert err.code() == grpc.StatusCode.NOT_FOUND
            return False
        return reply.metrics.instances == 2 and reply.metrics.tpot.count == 40 and reply

    from tests.conftest import eventually

    reply = await eventually(both, what="both instances' tpot")
    t = reply.metrics.tpot
    assert t.p50_ms == pytest.approx((10 * 30 + 20 * 10) / 40)
    assert t.mean_ms == pytest.approx((12 * 30 + 22 * 10) / 40)
    assert (t.p95_ms, t.p99_ms) == (30, 60)
    assert reply.per_instance["a"].tpot.p50_ms == 10 and reply.per_instance["b"].tpot.p99_ms == 60
    assert isinstance(reply, monitor_pb2.GetThroughputResponse)
