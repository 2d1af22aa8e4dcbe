"""The router over real gRPC channels on port 0, in front of real tiny target
services and small fake targets (real servers that proxy to a real target and
fail in chosen ways)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2_grpc, router_pb2, stats_pb2, stats_pb2_grpc
from tests.conftest import eventually, hf_greedy
from tests.router_helpers import (SERVING, FakeTarget, bare_instance, collect, collect_chunks, fake_target, register,
                                  request, routable, running_router, start_target, wait_routable)


# -- fixtures ---------------------------------------------------------------
@pytest.fixture(scope="module")
async def targets(tiny_models):
    apps = [await start_target(tiny_models) for _ in range(2)]
    channel = grpc.aio.insecure_channel(apps[0].address)
    yield apps, model_pb2_grpc.TargetModelStub(channel)
    await channel.close()
    for app in apps:
        await app.stop(0)


@pytest.fixture(scope="module")
async def router(targets):
    apps, _ = targets
    async with running_router([a.address for a in apps]) as (app, stub, channel):
        await wait_routable(stub, [a.address for a in apps])
        yield app, stub, channel


# -- tests ------------------------------------------------------------------
async def test_serving_without_targets_and_unavailable_says_why():
    async with running_router() as (_, stub, channel):
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "llmesh.v1.Router", "llmesh.v1.Stats"):
            assert (await health.Check(health_pb2.HealthCheckRequest(service=name))).status == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request([1, 2, 3]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no target instance registered in pool 'default'" in err.value.details()


async def test_greedy_through_router_equals_direct_and_round_robin_spreads(router, targets, reference_model):
    _, stub, _ = router
    apps, direct = targets
    used = []
    for i in range(4):
        prompt = [5 + i, 17, 42, 99]
        tokens, chunks = await collect(stub, request(prompt, max_new_tokens=10))
        direct_tokens, _ = await collect(direct, request(prompt, max_new_tokens=10))
        assert tokens == direct_tokens == hf_greedy(reference_model, prompt, 10)
        assert chunks[-1].finish_reason == gen.FINISH_REASON_LENGTH
        assert chunks[-1].usage.prompt_tokens == 4 and chunks[-1].usage.completion_tokens == 10
        assert len({c.request_id for c in chunks}) == 1 and chunks[0].request_id
        used.append(chunks[-1].instance_id)
    assert sorted(used) == sorted([a.address for a in apps] * 2)


async def test_complete_collects_the_stream(router, targets):
    _, stub, _ = router
    _, direct = targets
    req = request(text="The meaning of", max_new_tokens=9)
    req.request_id = "complete-1"
    reply = await stub.Complete(req)
    tokens, chunks = await collect(direct, req)
    assert list(reply.token_ids) == tokens
    assert reply.text == "".join(c.text for c in chunks)
    assert reply.request_id == "complete-1" and reply.finish_reason == gen.FINISH_REASON_LENGTH
    assert reply.usage.completion_tokens == 9 and reply.instance_id


async def test_seeded_sampling_through_router_equals_direct(router, targets):
    _, stub, _ = router
    _, direct = targets
    req = request([7, 8, 9], max_new_tokens=12, temperature=1.0, seed=1234)
    assert (await collect(stub, req))[0] == (await collect(direct, req))[0]


@pytest.mark.parametrize("req, code, field", [
    (request(ids=[]), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (request(text=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (gen.GenerateRequest(prompt=gen.Prompt(text="hi")), grpc.StatusCode.INVALID_ARGUMENT, "sampling"),
    (request([1, 2], max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (request([1, 2], temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (request([1, 2], top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (request([1, 2], stop=["ok", ""]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    (gen.GenerateRequest(prompt=gen.Prompt(text="hi"), sampling=gen.SamplingParams(max_new_tokens=2), priority=42),
     grpc.StatusCode.INVALID_ARGUMENT, "priority"),
    # Only the target knows its context and vocabulary: its status passes through.
    (request([1, 2], max_new_tokens=10_000), grpc.StatusCode.OUT_OF_RANGE, "max_new_tokens"),
    (request([1, 999_999]), grpc.StatusCode.OUT_OF_RANGE, "tokens"),
    (request([1] * 300), grpc.StatusCode.OUT_OF_RANGE, "prompt"),
])
async def test_bad_input_gets_the_right_status_and_router_stays_up(router, targets, req, code, field):
    _, stub, channel = router
    apps, _ = targets
    for rpc in (lambda: collect(stub, req), lambda: stub.Complete(req)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rpc()
        assert err.value.code() == code
        assert field in err.value.details() and "Traceback" not in err.value.details()
    assert (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())).status == SERVING
    assert await routable(stub, [a.address for a in apps])  # a client's mistake is not the instance's fault


async def test_register_list_drain_deregister(targets):
    apps, _ = targets
    a, b = apps
    async with running_router(policy="least_loaded") as (_, stub, _):
        status = await register(stub, "a", a.address)
        assert status.spec.id == "a" and status.spec.pool == "default"
        assert status.state == router_pb2.INSTANCE_STATE_ACTIVE
        await register(stub, "b", b.address)
        await register(stub, "d", "127.0.0.1:1", role=stats_pb2.ROLE_DRAFT, pool="other")
        await wait_routable(stub, ["a", "b"])
        listed = await stub.ListInstances(router_pb2.ListInstancesRequest(role=stats_pb2.ROLE_TARGET))
        assert [i.spec.id for i in listed.instances] == ["a", "b"] and listed.policy == "least_loaded"
        for inst in listed.instances:
            assert inst.load.role == stats_pb2.ROLE_TARGET and 0 <= inst.load_age_s < 2.0 and inst.score > 0
        drafts = await stub.ListInstances(router_pb2.ListInstancesRequest(pool="other"))
        assert [i.spec.id for i in drafts.instances] == ["d"]
        assert drafts.instances[0].health != router_pb2.INSTANCE_HEALTH_SERVING

        drained = await stub.DrainInstance(router_pb2.DrainInstanceRequest(id="a"))
        assert drained.instance.state == router_pb2.INSTANCE_STATE_DRAINING
        for i in range(3):
            _, chunks = await collect(stub, request([3, 4, i], max_new_tokens=2))
            assert chunks[-1].instance_id == "b"

        await stub.DeregisterInstance(router_pb2.DeregisterInstanceRequest(id="a"))
        listed = await stub.ListInstances(router_pb2.ListInstancesRequest())
        assert [i.spec.id for i in listed.instances] == ["b", "d"]
        for rpc, req in ((stub.DeregisterInstance, router_pb2.DeregisterInstanceRequest(id="a")),
                         (stub.DrainInstance, router_pb2.DrainInstanceRequest(id="zzz"))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rpc(req)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

        # Registering again puts a drained instance back in rotation.
        await stub.DrainInstance(router_pb2.DrainInstanceRequest(id="b"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request([1, 2]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "b draining" in err.value.details()
        await register(stub, "b", b.address)
        assert (await collect(stub, request([1, 2])))[1][-1].instance_id == "b"


@pytest.mark.parametrize("spec, field", [
    (router_pb2.InstanceSpec(address="nope", role=stats_pb2.ROLE_TARGET), "address"),
    (router_pb2.InstanceSpec(address="127.0.0.1:5"), "role"),
    (router_pb2.InstanceSpec(address="127.0.0.1:5", role=stats_pb2.ROLE_ROUTER), "role"),
    (router_pb2.InstanceSpec(id=" x ", address="127.0.0.1:5", role=stats_pb2.ROLE_TARGET), "start or end with spaces"),
    (router_pb2.InstanceSpec(id="a\nb", address="127.0.0.1:5", role=stats_pb2.ROLE_TARGET), "control characters"),
    (router_pb2.InstanceSpec(address="127.0.0.1:5", role=stats_pb2.ROLE_TARGET, labels={"a\nb": "c"}),
     "instance.labels"),
    (router_pb2.InstanceSpec(address="127.0.0.1:5", role=stats_pb2.ROLE_TARGET, labels={"a": "b\x00c"}),
     "control characters"),
])
async def test_register_refuses_bad_specs(router, spec, field):
    _, stub, _ = router
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RegisterInstance(router_pb2.RegisterInstanceRequest(instance=spec))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()


async def test_unavailable_within_a_second_when_the_only_target_stops(tiny_models):
    target = await start_target(tiny_models)
    async with running_router([target.address]) as (_, stub, channel):
        await wait_routable(stub, [target.address])
        assert len((await collect(stub, request([1, 2, 3], max_new_tokens=3)))[0]) == 3
        await target.stop(0)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request([1, 2, 3], max_new_tokens=3), timeout=5)
        assert time.monotonic() - started < 1.0
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        details = err.value.details()
        assert "no healthy target instance in pool 'default' (1 registered:" in details
        assert target.address in details
        assert (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())).status == SERVING


async def test_resource_exhausted_passes_through_with_retry_after_or_goes_elsewhere(tiny_models, targets):
    apps, _ = targets
    full = await start_target(tiny_models, max_queue=0)  # refuses every request
    try:
        async with running_router() as (_, stub, _):
            await register(stub, "1-full", full.address)
            await wait_routable(stub, ["1-full"])
            for rpc in (lambda: collect(stub, request([1, 2, 3])), lambda: stub.Complete(request([1, 2, 3]))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await rpc()
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.value.details()
                assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 0
            await register(stub, "2-real", apps[0].address)
            await wait_routable(stub, ["2-real"])
            for i in range(2):
                tokens, chunks = await collect(stub, request([1, 2, i], max_new_tokens=3))
                assert len(tokens) == 3 and chunks[-1].instance_id == "2-real"
    finally:
        await full.stop(0)


async def test_a_burst_past_grpcs_pending_call_limit_gets_admission_not_a_cut_off(tiny_models):
    """1500 calls at once, more than grpc core holds for a server by default
    (1000): each one reaches the router and the target, and is served or
    refused by their admission (RESOURCE_EXHAUSTED), never cut off with
    CANCELLED; and the target is still routable afterwards."""
    target = await start_target(tiny_models, max_queue=32)
    try:
        async with running_router([target.address]) as (_, stub, _):
            await wait_routable(stub, [target.address])

            async def one(i: int) -> str:
                try:
                    await collect(stub, request([1, 2, i % 50 + 3], max_new_tokens=1))
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name

            codes = collections.Counter(await asyncio.gather(*(one(i) for i in range(1500))))
            assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and codes["OK"] > 0, codes
            assert await routable(stub, [target.address])
    finally:
        await target.stop(0)


async def collect_call(call):
    return [t async for c in call for t in c.token_ids]


async def test_retry_before_first_token_on_another_instance(targets, reference_model):
    apps, _ = targets
    failing = FakeTarget(fail=grpc.StatusCode.UNAVAILABLE)
    async with fake_target(failing) as (_, address), running_router() as (app, stub, _):
        await register(stub, "1-failing", address)
        await register(stub, "2-real", apps[0].address)
        await wait_routable(stub, ["1-failing", "2-real"])
        for i in range(2):  # round robin sends one of the two requests to the failing one first
            prompt = [11, 12, 13 + i]
            tokens, chunks = await collect(stub, request(prompt, max_new_tokens=6))
            assert tokens == hf_greedy(reference_model, prompt, 6)
            assert {c.instance_id for c in chunks} == {"2-real"}
        assert len(failing.requests) == 1
        assert app.upstreams.registry.get("1-failing").consecutive_failures == 1


async def test_a_clients_fault_found_by_a_target_is_not_the_fleets_error(targets):
    """errors_total (and the error rate alerts read) counts the fleet's failures, not a client's bad
    input, whether the router or a target found it: a token id past the vocabulary, which only the
    target knows, counted as an error of the router."""
    apps, _ = targets
    broken = FakeTarget(fail=grpc.StatusCode.INTERNAL)
    async with fake_target(broken) as (_, address), running_router([apps[0].address], max_attempts=1) as (app, stub, _):
        await wait_routable(stub, [apps[0].address])
        counters = app.metrics.counters
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request([1, 10 ** 6]))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert (counters["requests_total"], counters["errors_total"]) == (1, 0)
        await register(stub, "broken", address)
        await stub.DeregisterInstance(router_pb2.DeregisterInstanceRequest(id=apps[0].address))
        await wait_routable(stub, ["broken"])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request([1, 2]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (counters["requests_total"], counters["errors_total"]) == (2, 1)


async def test_retries_are_bounded_by_max_attempts(targets):
    fakes = [FakeTarget(fail=grpc.StatusCode.UNAVAILABLE) for _ in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        addresses = [(await stack.enter_async_context(fake_target(f)))[1] for f in fakes]
        _, stub, _ = await stack.enter_async_context(running_router(addresses, max_attempts=2))
        await wait_routable(stub, addresses)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request([1, 2]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "gave up after 2 attempt(s)" in err.value.details()
        assert sum(len(f.requests) for f in fakes) == 2


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 77}, {"temperature": 0.8, "top_k": 20}])
async def test_mid_stream_resume_is_exact(targets, sampling):
    apps, direct = targets
    breaking = FakeTarget(upstream=apps[0].address, break_after=3)
    async with fake_target(breaking) as (_, address), running_router() as (_, stub, _):
        await register(stub, "1-breaking", address)
        await register(stub, "2-real", apps[1].address)
        await wait_routable(stub, ["1-breaking", "2-real"])
        req = request([21, 22, 23], max_new_tokens=12, **sampling)
        tokens, chunks = await collect(stub, req)
        assert [c.instance_id for c in chunks if c.token_ids][0] == "1-breaking"
        assert chunks[-1].instance_id == "2-real" and chunks[-1].finish_reason == gen.FINISH_REASON_LENGTH
        assert chunks[-1].usage.prompt_tokens == 3 and chunks[-1].usage.completion_tokens == 12
        assert len(tokens) == 12
        if "seed" in sampling or not sampling:
            assert tokens == (await collect(direct, req))[0]
        else:  # the router seeded the request: every attempt got the same seed
            assert breaking.requests[0].sampling.HasField("seed")


async def test_a_stream_broken_after_its_last_token_just_finishes(targets, reference_model):
    apps, _ = targets
    breaking = FakeTarget(upstream=apps[0].address, lose_finish=True)
    async with fake_target(breaking) as (_, address), running_router([address]) as (_, stub, _):
        await wait_routable(stub, [address])
        tokens, chunks = await collect(stub, request([4, 5, 6], max_new_tokens=5))
    assert tokens == hf_greedy(reference_model, [4, 5, 6], 5)
    assert chunks[-1].finish_reason == gen.FINISH_REASON_LENGTH and len(breaking.requests) == 1


async def test_streams_resume_when_their_target_is_killed(targets, reference_model):
    apps, _ = targets
    holding = FakeTarget(upstream=apps[0].address, hold_after=2)
    n = 4
    async with running_router() as (app, stub, _):
        async with fake_target(holding) as (server, address):
            await register(stub, "1-dying", address)
            await register(stub, "2-real", apps[1].address)
            await wait_routable(stub, ["1-dying", "2-real"])
            prompts = [[30 + i, 31, 32] for i in range(2 * n)]
            calls = [stub.Generate(request(p, max_new_tokens=10)) for p in prompts]
            results = [asyncio.create_task(collect_chunks(c)) for c in calls]
            await eventually(lambda: holding.held >= n, what="streams to hang on the dying target")
            await server.stop(0)
        outputs = await asyncio.gather(*results)
    for prompt, chunks in zip(prompts, outputs):
        assert [t for c in chunks for t in c.token_ids] == hf_greedy(reference_model, prompt, 10)
        assert chunks[-1].finish_reason == gen.FINISH_REASON_LENGTH
    resumed = [chunks for chunks in outputs if chunks[0].instance_id == "1-dying"]
    assert len(resumed) == n and all(chunks[-1].instance_id == "2-real" for chunks in resumed)


async def test_streams_on_a_frozen_target_resume_elsewhere_and_wait_where_there_is_none(targets, reference_model):
    """A frozen target (SIGSTOP) keeps its connections: its streams got no chunk and no error until
    the client's deadline, while new requests already went elsewhere. Once neither chunks nor load
    reports have come for stale_after_s, they resume on another target, exact; with no other
    target they wait for it to come back."""
    apps, _ = targets
    frozen = FakeTarget(upstream=apps[0].address, hold_after=2, freeze=True)
    async with fake_target(frozen) as (_, address), running_router(stale_after_s=0.5) as (app, stub, _):
        await register(stub, "1-frozen", address)
        await register(stub, "2-real", apps[1].address)
        await wait_routable(stub, ["1-frozen", "2-real"])
        prompts = [[40 + i, 41, 42] for i in range(4)]
        calls = [stub.Generate(request(p, max_new_tokens=8), timeout=60) for p in prompts]
        outputs = await asyncio.wait_for(asyncio.gather(*(collect_chunks(c) for c in calls)), 30)
        for prompt, chunks in zip(prompts, outputs):
            assert [t for c in chunks for t in c.token_ids] == hf_greedy(reference_model, prompt, 8)
        cut = [chunks for chunks in outputs if chunks[0].instance_id == "1-frozen"]
        assert cut and all(chunks[-1].instance_id == "2-real" for chunks in cut)
        assert frozen.cancelled == len(cut)  # the frozen target's streams were let go
    alone = FakeTarget(upstream=apps[0].address, hold_after=2, freeze=True)
    async with fake_target(alone) as (_, address), running_router(stale_after_s=0.3) as (app, stub, _):
        await register(stub, "only", address)
        await wait_routable(stub, ["only"])
        call = stub.Generate(request([7, 8, 9], max_new_tokens=6), timeout=60)
        pending = asyncio.create_task(collect_chunks(call))
        await eventually(lambda: alone.held == 1, what="the stream to hang")
        await asyncio.sleep(1.5)  # sleep-ok: five stale periods in which the stream must not be cut
        assert not pending.done()
        alone.released.set()
        chunks = await asyncio.wait_for(pending, 30)
        assert chunks[-1].finish_reason == gen.FINISH_REASON_LENGTH
        assert [t for c in chunks for t in c.token_ids] == hf_greedy(reference_model, [7, 8, 9], 6)


async def test_client_cancel_cancels_the_upstream_call(targets):
    apps, _ = targets
    holding = FakeTarget(upstream=apps[0].address, hold_after=1)
    async with fake_target(holding) as (_, address), running_router() as (app, stub, _):
        await register(stub, "only", address)
        await wait_routable(stub, ["only"])
        call = stub.Generate(request([1, 2, 3], max_new_tokens=10), timeout=30)
        await call.read()
        await eventually(lambda: holding.held == 1, what="the upstream stream to hang")
        assert app.upstreams.registry.get("only").in_flight == 1
        call.cancel()
        await eventually(lambda: holding.cancelled == 1, what="the upstream call to be cancelled")
        await eventually(lambda: app.forwarder.in_flight == 0 and app.upstreams.registry.get("only").in_flight == 0,
                         what="in-flight counts to drop")
        # The deadline travelled with the request.
        assert holding.time_remaining[0] is not None and 0 < holding.time_remaining[0] <= 30.5  # the wire rounds up


async def test_trace_context_reaches_the_target(targets):
    apps, _ = targets
    router_spans, target_spans = InMemorySpanExporter(), InMemorySpanExporter()
    router_provider, target_provider = TracerProvider(), TracerProvider()
    router_provider.add_span_processor(SimpleSpanProcessor(router_spans))
    target_provider.add_span_processor(SimpleSpanProcessor(target_spans))
    proxy = FakeTarget(upstream=apps[0].address)
    async with fake_target(proxy, target_provider) as (_, address), \
            running_router([address], provider=router_provider) as (_, stub, _):
        await wait_routable(stub, [address])
        await collect(stub, request([1, 2], max_new_tokens=2))
        served = lambda: [s for s in target_spans.get_finished_spans()  # noqa: E731
                          if s.name.endswith("TargetModel/Generate")]
        await eventually(served, what="the target's span")
    served = served()[0]
    routed = [s for s in router_spans.get_finished_spans() if s.name.endswith("Router/Generate")][0]
    assert served.context.trace_id == routed.context.trace_id


async def test_router_stats_report_what_it_forwarded(router):
    app, stub, channel = router
    for i in range(3):
        await collect(stub, request([2, 3, i], max_new_tokens=5))
    call = stats_pb2_grpc.StatsStub(channel).Watch(stats_pb2.WatchStatsRequest(interval_s=0.05))
    report = await call.read()
    call.cancel()
    assert report.role == stats_pb2.ROLE_ROUTER and report.instance_id == app.instance_id
    assert report.requests_total >= 3 and report.tokens_generated_total >= 15
    assert report.e2e.count >= 3 and report.ttft.p50_ms > 0 and report.tokens_per_second > 0
    assert report.in_flight == 0


async def test_admission_bound(targets):
    apps, _ = targets
    holding = FakeTarget(upstream=apps[0].address, hold_after=1)
    async with fake_target(holding) as (_, address), running_router([address], max_in_flight=1) as (_, stub, _):
        await wait_routable(stub, [address])
        call = stub.Generate(request([1, 2, 3], max_new_tokens=10))
        await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request([1, 2]))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(err.value.trailing_metadata()).get("retry-after-ms")
        call.cancel()



async def test_health_watch_changes_reach_the_registry_at_once():
    async with bare_instance() as (servicer, address), running_router(health_interval_s=30.0) as (app, stub, _):
        await register(stub, "w", address)
        await wait_routable(stub, ["w"])
        started = time.monotonic()
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await eventually(lambda: not app.upstreams.registry.get("w").routable(time.monotonic(), 2.0),
                         what="NOT_SERVING to arrive")
        assert time.monotonic() - started < 1.0  # streamed, not polled (the poll interval is 30 s)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request([1, 2]))
        assert "w NOT_SERVING" in err.value.details()
        await servicer.set("", SERVING)
        await wait_routable(stub, ["w"])


async def test_a_healthy_draft_is_sent_with_the_request(targets):
    apps, _ = targets
    proxy = FakeTarget(upstream=apps[0].address)
    tokenizer = apps[0].loaded.tokenizer_hash  # a draft is routable only with its targets' tokenizer
    async with bare_instance(stats_pb2.ROLE_DRAFT, tokenizer_hash=tokenizer) as (_, draft), \
            fake_target(proxy) as (_, address), \
            running_router([address], drafts=[draft]) as (_, stub, _):
        await wait_routable(stub, [address, draft])
        await collect(stub, request([1, 2], max_new_tokens=2))
        no_spec = request([1, 2], max_new_tokens=2)
        no_spec.speculation.enabled = False
        await collect(stub, no_spec)
        chosen = request([1, 2], max_new_tokens=2)
        chosen.draft_address = draft  # a client may pin one of the router's drafts
        await collect(stub, chosen)
        # Not an address of its own choosing: a caller of the public port must not
        # make a target connect anywhere. Nor the router's resume_tokens.
        chosen.draft_address = "127.0.0.1:9"
        resumed = request([1, 2], max_new_tokens=4)
        resumed.resume_tokens.extend([5, 6])
        for bad, field in ((chosen, "draft_address"), (resumed, "resume_tokens")):
            for rpc in (lambda: collect(stub, bad), lambda: stub.Complete(bad)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await rpc()
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    assert [r.draft_address for r in proxy.requests] == [draft, "", draft]


# -- policies, pools, admission, cache, cancellation, authentication ----------
def with_priority(req: gen.GenerateRequest, priority: int) -> gen.GenerateRequest:
    req.priority = priority
    return req


@pytest.mark.parametrize("policy", ["score", "least_loaded", "power_of_two", "prefix_affinity"])
async def test_every_policy_routes_exactly(targets, reference_model, policy):
    apps, _ = targets
    addresses = [a.address for a in apps]
    async with running_router(addresses, policy=policy) as (_, stub, _):
        await wait_routable(stub, addresses)
        used = set()
        for i in range(4):
            prompt = [60 + i, 61, 62]
            tokens, chunks = await collect(stub, request(prompt, max_new_tokens=4))
            assert tokens == hf_greedy(reference_model, prompt, 4)
            used.add(chunks[-1].instance_id)
        assert used <= set(addresses)
        assert (await stub.ListInstances(router_pb2.ListInstancesRequest())).policy == policy


async def test_prefix_affinity_keeps_a_shared_prefix_on_one_target_and_one_draft(targets):
    apps, _ = targets
    proxies = [FakeTarget(upstream=a.address) for a in apps]
    async with contextlib.AsyncExitStack() as stack:
        addresses = [(await stack.enter_async_context(fake_target(p)))[1] for p in proxies]
        tokenizer = apps[0].loaded.tokenizer_hash
        drafts = [(await stack.enter_async_context(bare_instance(stats_pb2.ROLE_DRAFT, tokenizer_hash=tokenizer)))[1]
                  for _ in range(2)]
        _, stub, _ = await stack.enter_async_context(
            running_router(addresses, drafts=drafts, policy="prefix_affinity", affinity_block=4))
        await wait_routable(stub, addresses + drafts)
        system = list(range(40, 56))  # four blocks of four tokens
        used = [(await collect(stub, request(system + [i, i + 1], max_new_tokens=2)))[1][-1].instance_id
                for i in range(6)]
        assert len(set(used)) == 1
        sent = [r for p in proxies for r in p.requests]
        assert len({r.draft_address for r in sent}) == 1 and sent[0].draft_address in drafts
        # Prompts that share no prefix are balanced as by least-loaded.
        others = {(await collect(stub, request([70 + 10 * i] * 16, max_new_tokens=2)))[1][-1].instance_id
                  for i in range(4)}
        assert others == set(addresses)


async def test_priority_classes_go_to_their_pools_and_spill_over_only_where_allowed(targets):
    apps, _ = targets
    fast, bulk = (a.address for a in apps)
    pools = ["interactive=fast", "batch=bulk"]
    async with running_router([f"fast@{fast}", f"bulk@{bulk}"], pools=pools) as (_, stub, _):
        await wait_routable(stub, [fast, bulk])
        for priority, expected in ((gen.PRIORITY_INTERACTIVE, fast), (gen.PRIORITY_BATCH, bulk)):
            for i in range(3):
                _, chunks = await collect(stub, with_priority(request([1, 2, i], max_new_tokens=2), priority))
                assert chunks[-1].instance_id == expected
        listed = await stub.ListInstances(router_pb2.ListInstancesRequest())
        assert {i.spec.id: i.spec.pool for i in listed.instances} == {fast: "fast", bulk: "bulk"}
        for inst in listed.instances:  # health, pool, latest load and score, for `llmesh status`
            assert inst.health == router_pb2.INSTANCE_HEALTH_SERVING and inst.load.timestamp > 0 and inst.score > 0
        routes = {r.priority: list(r.pools) for r in listed.router.routes}
        assert routes == {gen.PRIORITY_BATCH: ["bulk"], gen.PRIORITY_NORMAL: ["default"],
                          gen.PRIORITY_INTERACTIVE: ["fast"]}
        assert [p.pool for p in listed.router.pools] == ["bulk", "default", "fast"]
        # Normal requests belong to the default pool: nothing there, and no spillover allowed.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request([1, 2]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no target instance registered in pool 'default'" in err.value.details()
        await stub.DrainInstance(router_pb2.DrainInstanceRequest(id=bulk))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, with_priority(request([1, 2]), gen.PRIORITY_BATCH))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and f"{bulk} draining" in err.value.details()

    async with running_router([f"fast@{fast}"], pools=pools, spillover=["batch->fast"]) as (_, stub, _):
        await register(stub, "b", bulk, pool="bulk")  # RegisterInstance names the pool
        await wait_routable(stub, [fast, "b"])
        batch = lambda i: with_priority(request([3, 4, i], max_new_tokens=2), gen.PRIORITY_BATCH)  # noqa: E731
        assert (await collect(stub, batch(0)))[1][-1].instance_id == "b"
        await stub.DrainInstance(router_pb2.DrainInstanceRequest(id="b"))
        assert (await collect(stub, batch(1)))[1][-1].instance_id == fast  # spilled over
        with pytest.raises(grpc.aio.AioRpcError) as err:  # interactive may not spill over to bulk
            await collect(stub, with_priority(request([1, 2]), gen.PRIORITY_NORMAL))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        listed = await stub.ListInstances(router_pb2.ListInstancesRequest())
        assert [list(r.pools) for r in listed.router.routes if r.priority == gen.PRIORITY_BATCH] == [["bulk", "fast"]]


@pytest.mark.parametrize("spill", [False, True])
async def test_a_full_pool_refuses_at_once_with_retry_after_or_spills_over(targets, spill):
    apps, _ = targets
    holding = FakeTarget(upstream=apps[0].address, hold_after=1)
    async with fake_target(holding) as (_, held), running_router(
            [f"fast@{held}", apps[1].address], pools=["interactive=fast"], pool_limits=["fast=1"],
            spillover=["interactive->default"] if spill else []) as (app, stub, _):
        await wait_routable(stub, [held, apps[1].address])
        interactive = lambda i: with_priority(request([5, 6, i], max_new_tokens=3),  # noqa: E731
                                              gen.PRIORITY_INTERACTIVE)
        call = stub.Generate(interactive(0))
        await call.read()
        await eventually(lambda: holding.held == 1, what="the first request to hold its slot")
        if spill:
            _, chunks = await collect(stub, interactive(1))
            assert chunks[-1].instance_id == apps[1].address
        else:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, interactive(1))
            assert time.monotonic() - started < 0.5  # at once, not after a queue wait
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "pool 'fast' (1/1) full" in err.value.details()
            assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 0
        # Other classes' pools are not bounded by fast's.
        assert (await collect(stub, request([7, 8], max_new_tokens=2)))[1][-1].instance_id == apps[1].address
        stats = (await stub.ListInstances(router_pb2.ListInstancesRequest())).router
        fast_pool = [p for p in stats.pools if p.pool == "fast"][0]
        assert (fast_pool.in_flight, fast_pool.max_in_flight, fast_pool.rejected_total) == (1, 1, 0 if spill else 1)
        assert stats.rejected_total == (0 if spill else 1) and stats.in_flight == 1
        call.cancel()
        await eventually(lambda: app.forwarder.admission.in_flight["fast"] == 0, what="the slot to be freed")


async def test_response_cache_answers_deterministic_requests(targets):
    apps, _ = targets
    proxy = FakeTarget(upstream=apps[0].address)
    async with fake_target(proxy) as (_, address), running_router([address], cache_size=4) as (_, stub, _):
        await wait_routable(stub, [address])
        greedy = request([9, 8, 7], max_new_tokens=6)
        tokens, live = await collect(stub, greedy)
        again_tokens, again = await collect(stub, greedy)
        assert again_tokens == tokens and len(proxy.requests) == 1
        assert all(c.cached for c in again) and not any(c.cached for c in live)
        assert [(c.text, c.finish_reason, c.usage.completion_tokens) for c in again] == \
               [(c.text, c.finish_reason, c.usage.completion_tokens) for c in live]
        assert live[0].request_id != again[0].request_id and len({c.request_id for c in again}) == 1
        # The replay's timing is its own (no queue, no prefill), and it speculated nothing.
        assert again[-1].timing.queue_ms == 0 and again[-1].timing.elapsed_ms < live[-1].timing.elapsed_ms
        assert again[-1].timing.ttft_ms <= again[-1].timing.elapsed_ms
        assert not any(c.HasField("speculation") for c in again)
        # Another id and priority ask the same question (one pool here); Complete is answered too.
        same = with_priority(request([9, 8, 7], max_new_tokens=6), gen.PRIORITY_BATCH)
        same.request_id = "again"
        reply = await stub.Complete(same)
        assert reply.cached and reply.request_id == "again" and list(reply.token_ids) == tokens
        assert reply.text == "".join(c.text for c in live) and reply.finish_reason == gen.FINISH_REASON_LENGTH
        assert len(proxy.requests) == 1
        await collect(stub, request([9, 8, 7], max_new_tokens=5))  # other parameters: a miss
        seeded = request([9, 8, 7], max_new_tokens=6, temperature=1.0, seed=5)
        assert (await collect(stub, seeded))[0] == (await collect(stub, seeded))[0]
        unseeded = request([9, 8, 7], max_new_tokens=6, temperature=1.0)
        await collect(stub, unseeded)
        await collect(stub, unseeded)
        assert len(proxy.requests) == 5  # greedy, max_new_tokens=5, seeded once, unseeded twice
        stats = (await stub.ListInstances(router_pb2.ListInstancesRequest())).router
        assert (stats.cache_hits, stats.cache_misses, stats.cache_entries, stats.cache_capacity) == (3, 3, 3, 4)


async def test_only_finished_answers_are_cached(targets):
    apps, _ = targets
    holding = FakeTarget(upstream=apps[0].address, hold_after=1)
    breaking = FakeTarget(upstream=apps[0].address, break_after=2)
    async with fake_target(breaking) as (_, broken), running_router([broken], cache_size=4) as (_, stub, _):
        for _ in range(2):  # broken mid-stream with nowhere to resume: an error, never cached
            await wait_routable(stub, [broken])  # a break marks the instance unreachable until health says not
            with pytest.raises(grpc.aio.AioRpcError):
                await collect(stub, request([1, 2, 3], max_new_tokens=6))
        assert len(breaking.requests) == 2
    async with fake_target(holding) as (_, held), running_router([held], cache_size=4) as (app, stub, _):
        await wait_routable(stub, [held])
        for n in range(2):  # cancelled by the client: never cached
            call = stub.Generate(request([1, 2, 3], max_new_tokens=6))
            await call.read()
            call.cancel()
            await eventually(lambda: app.forwarder.in_flight == 0, what="the call to end")
        assert len(holding.requests) == 2
        stats = (await stub.ListInstances(router_pb2.ListInstancesRequest())).router
        assert (stats.cache_hits, stats.cache_misses, stats.cache_entries) == (0, 2, 0)


async def test_a_client_going_away_or_out_of_time_stops_the_targets_work(tiny_models):
    target = await start_target(tiny_models)
    engine = target.loaded.engine
    idle = lambda: engine.load().running == 0 and engine.load().queue_length == 0  # noqa: E731
    generated = lambda: engine.metrics.counters["tokens_generated_total"]  # noqa: E731
    try:
        async with running_router([target.address]) as (app, stub, _):
            await wait_routable(stub, [target.address])
            call = stub.Generate(request([1, 2, 3], max_new_tokens=240), timeout=30)
            await call.read()
            # The load snapshot is published after the step that sent the chunk.
            await eventually(lambda: engine.load().running == 1, what="the target to run the sequence")
            call.cancel()
            await eventually(idle, what="the target to drop the cancelled sequence")
            assert generated() < 240 and target.report().in_flight == 0
            assert app.upstreams.registry.get(target.address).in_flight == 0 and app.forwarder.in_flight == 0

            before = generated()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, request([4, 5, 6], max_new_tokens=240), timeout=0.1)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await eventually(idle, what="the target to drop the expired sequence")
            assert generated() - before < 240 and target.report().in_flight == 0
            # Neither counts against the instance.
            assert app.upstreams.registry.get(target.address).consecutive_failures == 0
    finally:
        await target.stop(0)


async def test_bearer_token_guards_the_router_but_not_health_reflection_or_stats(targets):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    apps, _ = targets
    good = [("authorization", "Bearer s3cret")]
    async with running_router([apps[0].address], auth_token="s3cret") as (_, stub, channel):
        await eventually(lambda: routable_with(stub, [apps[0].address], good), what="the target to be routable")
        rpcs = [lambda md: collect(stub, request([1, 2], max_new_tokens=2), metadata=md),
                lambda md: stub.Complete(request([1, 2], max_new_tokens=2), metadata=md),
                lambda md: stub.ListInstances(router_pb2.ListInstancesRequest(), metadata=md),
                lambda md: stub.DrainInstance(router_pb2.DrainInstanceRequest(id="nope"), metadata=md),
                lambda md: stub.DeregisterInstance(router_pb2.DeregisterInstanceRequest(id="nope"), metadata=md),
                lambda md: stub.RegisterInstance(router_pb2.RegisterInstanceRequest(), metadata=md)]
        for rpc in rpcs:
            for md in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await rpc(md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        tokens, _ = await collect(stub, request([1, 2], max_new_tokens=2), metadata=good)
        assert len(tokens) == 2
        assert (await stub.Complete(request([1, 2], max_new_tokens=2), metadata=good)).usage.completion_tokens == 2
        assert (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())).status == SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for reply in reflect for s in reply.list_services_response.service]
        assert "llmesh.v1.Router" in names
        watch = stats_pb2_grpc.StatsStub(channel).Watch(stats_pb2.WatchStatsRequest(interval_s=0.05))
        assert (await watch.read()).role == stats_pb2.ROLE_ROUTER
        watch.cancel()


async def routable_with(stub, ids, metadata) -> bool:
    reply = await stub.ListInstances(router_pb2.ListInstancesRequest(), metadata=metadata)
    return {i.spec.id for i in reply.instances if i.health == router_pb2.INSTANCE_HEALTH_SERVING} >= set(ids)


async def test_llmesh_status_prints_health_pool_load_and_score(targets):
    from services.cli import status

    apps, _ = targets
    nowhere = "127.0.0.1:9"
    async with running_router([f"fast@{apps[0].address}", apps[1].address], pool_limits=["fast=3"],
                              cache_size=2, auth_token="t") as (app, stub, _):
        await eventually(lambda: routable_with(stub, [a.address for a in apps], [("authorization", "Bearer t")]),
                         what="the targets to be routable")
        snapshot = await asyncio.to_thread(status.collect, app.address, nowhere, nowhere, 1.0, "t")
    rows = {r["id"]: r for r in snapshot["instances"]}
    assert rows[apps[0].address]["pool"] == "fast" and rows[apps[1].address]["pool"] == "default"
    assert all(r["health"] == "serving" and r["score"] > 0 and r["load_age_s"] < 2 for r in rows.values())
    lines = status.render(snapshot).splitlines()
    header = [line for line in lines if line.startswith("INSTANCE")][0]
    assert header.split()[-1] == "SCORE" and "POOL" in header and "HEALTH" in header
    row = [line for line in lines if line.startswith(apps[0].address)][0].split()
    assert row[3:6] == ["serving", "active", "fast"] and 0 < float(row[-1]) <= 1
    summary = [line for line in lines if line.startswith("router: ")][0]
    assert "policy round_robin" in summary and "cache 0 hits / 0 misses (0/2 answers)" in summary
    assert "pools fast 0/3" in summary
