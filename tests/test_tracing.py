"""A request's trace crosses every hop: client -> router -> target -> draft.

Each service gets its own tracer provider with an in-memory exporter, as
separate processes would; the spans they finish must share one trace id and
chain parent to child across the wire.
"""

from __future__ import annotations

import asyncio

import grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from router.config import RouterConfig
from router.main import create_server as create_router
from services.common import telemetry
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import router_pb2, router_pb2_grpc
from services.draft.config import DraftConfig
from services.draft.main import create_server as create_draft
from services.target.config import TargetConfig
from services.target.main import create_server as create_target
from tests.conftest import eventually


async def wait_routable(stub) -> None:
    for _ in range(500):
        listed = (await stub.ListInstances(router_pb2.ListInstancesRequest())).instances
        if listed and all(i.health == router_pb2.INSTANCE_HEALTH_SERVING for i in listed):
            return
        await asyncio.sleep(0.02)  # sleep-ok: bounded poll of a condition
    raise AssertionError("the router never saw its instances healthy")


async def generate_through(router: str, max_new_tokens: int, speculate: bool = False, metadata=()) -> list:
    """The chunks of one greedy generation of a token prompt through the router at ``router``, once it routes."""
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await wait_routable(stub)
        req = gen.GenerateRequest(prompt=gen.Prompt(tokens=gen.TokenIds(ids=[5, 6, 7])),
                                  sampling=gen.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
        if speculate:
            req.speculation.enabled = True
        return [c async for c in stub.Generate(req, metadata=metadata)]


def provider_for(name):
    exporter = InMemorySpanExporter()
    return telemetry.make_tracer_provider(name, exporter=exporter), exporter


async def test_one_trace_from_router_to_draft(tiny_models):
    draft_tp, draft_spans = provider_for("draft")
    target_tp, target_spans = provider_for("target")
    router_tp, router_spans = provider_for("router")
    draft = create_draft(DraftConfig.from_namespace({"model": str(tiny_models.draft), "port": 0}, env={}), draft_tp)
    await draft.start()
    target = create_target(TargetConfig.from_namespace({
        "model": str(tiny_models.target), "port": 0, "draft_address": draft.address,
        "speculation_min_acceptance": 0.0}, env={}), target_tp)
    await target.start()
    router = create_router(RouterConfig.from_namespace({"port": 0, "http_port": 0, "targets": [target.address],
                                                        "drafts": [draft.address]}, env={}), router_tp)
    await router.start()
    try:
        chunks = await generate_through(router.address, 8, speculate=True)
        assert chunks[-1].speculation.rounds > 0
        await eventually(lambda: any(s.name.endswith("DraftModel/Propose") for s in draft_spans.get_finished_spans()),
                         what="the draft's server span")
    finally:
        await router.stop(0)
        await target.stop(0)
        await draft.stop(0)

    def named(exporter, suffix, kind=None):
        return [s for s in exporter.get_finished_spans() if s.name.endswith(suffix)
                and (kind is None or s.kind.name == kind)]

    router_server = named(router_spans, "Router/Generate", "SERVER")[0]
    router_client = named(router_spans, "TargetModel/Generate", "CLIENT")[0]
    target_server = named(target_spans, "TargetModel/Generate", "SERVER")[0]
    target_client = named(target_spans, "DraftModel/Propose", "CLIENT")[0]
    draft_server = named(draft_spans, "DraftModel/Propose", "SERVER")[0]
    trace_id = router_server.context.trace_id
    for span in (router_client, target_server, target_client, draft_server):
        assert span.context.trace_id == trace_id, span.name
    assert target_server.parent.span_id == router_client.context.span_id
    assert draft_server.parent.span_id == target_client.context.span_id
    phases = {s.name: s for s in target_spans.get_finished_spans() if s.name.startswith("llmesh.")}
    assert {"llmesh.queue", "llmesh.prefill", "llmesh.decode"} <= set(phases)
    for span in phases.values():
        assert span.parent.span_id == target_server.context.span_id
        assert span.end_time >= span.start_time
    assert phases["llmesh.decode"].attributes["llmesh.spec.rounds"] > 0


async def test_a_router_that_exports_nothing_passes_the_clients_trace_on(tiny_models):
    """With no exporter configured a service makes no spans (nothing would read them; recording them cost
    the router's hop about a millisecond), yet the client's trace reaches the target that does export."""
    silent = telemetry.make_tracer_provider("router", env={})
    assert not silent.get_tracer("t").start_span("s").is_recording()
    target_tp, target_spans = provider_for("target")
    target = create_target(TargetConfig.from_namespace({"model": str(tiny_models.target), "port": 0}, env={}),
                           target_tp)
    await target.start()
    router = create_router(RouterConfig.from_namespace({"port": 0, "http_port": 0, "targets": [target.address]},
                                                       env={}), silent)
    await router.start()
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        chunks = await generate_through(router.address, 4, metadata=(("traceparent", f"00-{trace_id}-{span_id}-01"),))
        assert chunks[-1].finish_reason
    finally:
        await router.stop(0)
        await target.stop(0)
    server = [s for s in target_spans.get_finished_spans() if s.name.endswith("TargetModel/Generate")
              and s.kind.name == "SERVER"]
    assert len(server) == 1
    assert format(server[0].context.trace_id, "032x") == trace_id
    assert format(server[0].parent.span_id, "016x") == span_id
