"""Streams that end early leave no OpenTelemetry context behind.

A span's context is attached when a call's handler starts and must be
detached in the same asyncio task (the same ``contextvars.Context``); a
handler's async generator abandoned at a ``yield`` and finalized later by the
event loop's asyncgen hook runs in another task, and OpenTelemetry logs
"Failed to detach context" with a traceback for each attach. Each way a
stream can end early is tried here against in-process services whose
instrumentation is on: a client cancelling, a deadline, a stop sequence while
speculating with a draft, a failover to another target, and a draft stream
cut by the target.
"""

from __future__ import annotations

import asyncio
import gc
import logging

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from router.config import RouterConfig
from router.main import create_server as create_router
from services.common import telemetry
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2, model_pb2_grpc, router_pb2, router_pb2_grpc
from services.draft.config import DraftConfig
from services.draft.main import create_server as create_draft
from services.target.config import TargetConfig
from services.target.main import create_server as create_target
from tests.conftest import eventually

DETACH = "Failed to detach context"


def provider(name):
    return telemetry.make_tracer_provider(name, exporter=InMemorySpanExporter())


@pytest.fixture(scope="module")
async def suite(tiny_models):
    draft = create_draft(DraftConfig.from_namespace({"model": str(tiny_models.draft), "port": 0, "warmup": False},
                                                    env={}), provider("draft"))
    await draft.start()
    targets = []
    for _ in range(2):
        t = create_target(TargetConfig.from_namespace({
            "model": str(tiny_models.target), "port": 0, "warmup": False, "draft_address": draft.address,
            "speculation_min_acceptance": 0.0}, env={}), provider("target"))
        await t.start()
        targets.append(t)
    router = create_router(RouterConfig.from_namespace({
        "port": 0, "http_port": 0, "targets": [t.address for t in targets], "drafts": [draft.address], "policy": "round_robin",
        "load_interval_s": 0.1}, env={}), provider("router"))
    await router.start()
    channel = grpc.aio.insecure_channel(router.address)
    stub = router_pb2_grpc.RouterStub(channel)

    async def routable():
        listed = (await stub.ListInstances(router_pb2.ListInstancesRequest())).instances
        return len(listed) == 3 and all(i.health == router_pb2.INSTANCE_HEALTH_SERVING for i in listed)

    await eventually(routable, what="the router to see its instances serving")
    yield draft, targets, router, stub
    await channel.close()
    await router.stop(0)
    for t in targets:
        await t.stop(0)
    await draft.stop(0)


def request(ids, n, **kw):
    sampling = gen.SamplingParams(max_new_tokens=n, ignore_eos=True, stop=kw.pop("stop", ()))
    return gen.GenerateRequest(prompt=gen.Prompt(tokens=gen.TokenIds(ids=ids)), sampling=sampling, **kw)


async def settled(apps) -> None:
    """Every engine idle and every abandoned generator finalized (the loop's
    asyncgen hook schedules their aclose() as tasks; they run within a few
    iterations of the loop)."""
    def idle():
        return all(a.loaded.engine.load().running == 0 and a.loaded.engine.load().queue_length == 0 for a in apps)

    await eventually(idle, what="the engines to drop every sequence")
    for _ in range(3):
        gc.collect()
        for _ in range(20):
            await asyncio.sleep(0)  # sleep-ok: lets finalizer tasks run, no timing


@pytest.fixture
def detach_errors(caplog):
    caplog.set_level(logging.ERROR, logger="opentelemetry.context")
    return lambda: [r for r in caplog.records if DETACH in r.getMessage()]


async def test_client_cancel_on_the_target_and_through_the_router(suite, detach_errors):
    draft, targets, router, stub = suite
    async with grpc.aio.insecure_channel(targets[0].address) as channel:
        direct = model_pb2_grpc.TargetModelStub(channel)
        for speculate in (False, True):
            req = request([5, 6, 7], 200)
            req.speculation.enabled = speculate
            call = direct.Generate(req)
            await call.read()
            call.cancel()
    for speculate in (False, True):
        req = request([8, 9, 10], 200)
        req.speculation.enabled = speculate
        call = stub.Generate(req)
        await call.read()
        call.cancel()
    await settled([draft, *targets])
    assert detach_errors() == []


async def test_deadline_mid_stream(suite, detach_errors):
    draft, targets, router, stub = suite
    codes = []
    async with grpc.aio.insecure_channel(targets[1].address) as channel:
        direct = model_pb2_grpc.TargetModelStub(channel)
        for front in (direct, stub):
            for speculate in (False, True):
                for timeout in (0.05, 0.1, 0.2):
                    req = request([11, 12, 13], 240)
                    req.speculation.enabled = speculate
                    call = front.Generate(req, timeout=timeout)
                    try:
                        await call.read()  # then stop reading: the deadline passes with chunks unread
                    except grpc.aio.AioRpcError:
                        pass  # it passed before the first chunk: an early end too
                    codes.append(await call.code())
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    await settled([draft, *targets])
    assert detach_errors() == []


async def test_stop_sequence_while_speculating(suite, tiny_models, detach_errors):
    draft, targets, router, stub = suite
    probe = request([20, 21, 22], 30)
    probe.speculation.enabled = True
    chunks = [c async for c in stub.Generate(probe)]
    text = "".join(c.text for c in chunks)
    stop = text[len(text) // 3:len(text) // 3 + 2] or text[:1]
    for i in range(4):
        req = request([20, 21, 22], 30, stop=[stop])
        req.speculation.enabled = True
        req.speculation.gamma = 1 + i * 3
        chunks = [c async for c in stub.Generate(req)]
        assert chunks[-1].finish_reason == gen.FINISH_REASON_STOP
    await settled([draft, *targets])
    assert detach_errors() == []


async def test_failover_to_another_target(tiny_models, detach_errors):
    apps = []
    for _ in range(2):
        t = create_target(TargetConfig.from_namespace({"model": str(tiny_models.target), "port": 0,
                                                       "warmup": False}, env={}), provider("target"))
        await t.start()
        apps.append(t)
    router = create_router(RouterConfig.from_namespace({
        "port": 0, "http_port": 0, "targets": [a.address for a in apps], "policy": "round_robin", "load_interval_s": 0.1}, env={}),
        provider("router"))
    await router.start()
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)

            async def routable():
                listed = (await stub.ListInstances(router_pb2.ListInstancesRequest())).instances
                return all(i.health == router_pb2.INSTANCE_HEALTH_SERVING for i in listed)

            await eventually(routable, what="both targets serving")
            call = stub.Generate(request([30, 31, 32], 200))
            first = await call.read()
            dying = next(a for a in apps if a.address == first.instance_id)
            await dying.stop(0)
            rest = []
            while (chunk := await call.read()) is not grpc.aio.EOF:
                rest.append(chunk)
            assert rest[-1].finish_reason == gen.FINISH_REASON_LENGTH
            assert rest[-1].instance_id != first.instance_id
        await settled([a for a in apps if a is not dying])
    finally:
        await router.stop(0)
        for a in apps:
            await a.stop(0)
    assert detach_errors() == []


async def test_draft_stream_cut_by_its_caller(suite, detach_errors):
    draft, targets, router, stub = suite
    async with grpc.aio.insecure_channel(draft.address) as channel:
        propose = model_pb2_grpc.DraftModelStub(channel)
        for _ in range(3):
            call = propose.Propose()
            await call.write(model_pb2.ProposeRequest(request_id="cut", append_tokens=[1, 2, 3], gamma=4,
                                                      sampling=gen.SamplingParams()))
            await call.read()
            await call.write(model_pb2.ProposeRequest(append_tokens=[4], discard=4, gamma=4))
            call.cancel()
    await settled([draft])
    assert detach_errors() == []
