"""Helpers of the router's tests: a router and tiny targets on port 0, and
small real servers standing in for instances (fake targets that proxy to a
real one and fail in chosen ways, bare instances with only health and stats).

Every stand-in answers ``GetInfo`` as the role it is registered with (the
router routes to an instance only once it has), unless told not to.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from router.config import RouterConfig
from router.main import create_server as create_router
from services.common.config import BaseConfig
from services.common.server import new_server
from services.common.stats_service import StatsServicer
from services.common.stubs import SERVICE_NAMES
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2, model_pb2_grpc, router_pb2, router_pb2_grpc, stats_pb2, stats_pb2_grpc
from services.target.config import TargetConfig
from services.target.main import create_server as create_target
from tests.conftest import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING


async def start_target(tiny_models, provider=None, **overrides):
    config = TargetConfig.from_namespace({"model": str(tiny_models.target), "port": 0, "max_batch_size": 8,
                                          "warmup": False, **overrides}, env={})
    app = create_target(config, provider)
    await app.start()
    return app


@contextlib.asynccontextmanager
async def running_router(targets=(), provider=None, **overrides):
    # Round robin unless a test asks otherwise: several tests count on its order.
    config = RouterConfig.from_namespace({"port": 0, "http_port": 0, "targets": list(targets), "load_interval_s": 0.1,
                                          "policy": "round_robin", **overrides}, env={})
    app = create_router(config, provider)
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    try:
        yield app, router_pb2_grpc.RouterStub(channel), channel
    finally:
        await channel.close()
        await app.stop(0)


async def routable(stub, ids) -> bool:
    reply = await stub.ListInstances(router_pb2.ListInstancesRequest())
    serving = {i.spec.id for i in reply.instances
               if i.health == router_pb2.INSTANCE_HEALTH_SERVING and i.state == router_pb2.INSTANCE_STATE_ACTIVE}
    return set(ids) <= serving


async def wait_routable(stub, ids):
    await eventually(lambda: routable(stub, ids), what=f"{ids} to be routable")


async def register(stub, instance_id, address, role=stats_pb2.ROLE_TARGET, pool=""):
    reply = await stub.RegisterInstance(router_pb2.RegisterInstanceRequest(
        instance=router_pb2.InstanceSpec(id=instance_id, address=address, role=role, pool=pool)))
    return reply.instance


def request(ids=None, text=None, **sampling):
    sampling.setdefault("max_new_tokens", 8)
    sampling.setdefault("ignore_eos", True)
    prompt = gen.Prompt(text=text) if text is not None else gen.Prompt(tokens=gen.TokenIds(ids=ids))
    return gen.GenerateRequest(prompt=prompt, sampling=gen.SamplingParams(**sampling))


async def collect(stub, req, **kw):
    chunks = [c async for c in stub.Generate(req, **kw)]
    return [t for c in chunks for t in c.token_ids], chunks



async def collect_chunks(call):
    return [c async for c in call]


class FakeTarget(model_pb2_grpc.TargetModelServicer):
    """TargetModel.Generate that proxies to a real target, and can fail before
    the first token (``fail``), break with UNAVAILABLE after ``break_after``
    tokens, hang after ``hold_after`` tokens until its server is stopped, or
    break just before the last chunk's finish reason (``lose_finish``).
    GetInfo answers as a target (the upstream's info when there is one)."""

    def __init__(self, upstream: str | None = None, fail: grpc.StatusCode | None = None,
                 break_after: int | None = None, hold_after: int | None = None, lose_finish: bool = False,
                 freeze: bool = False) -> None:
        """``freeze``: while a stream holds, the instance's load reports stop too (a frozen process:
        SIGSTOP), until :attr:`released` is set, which also ends the holds."""
        self.upstream, self.fail, self.break_after, self.hold_after = upstream, fail, break_after, hold_after
        self.lose_finish = lose_finish
        self.freeze = freeze
        self.released = asyncio.Event()
        self.requests: list[gen.GenerateRequest] = []
        self.time_remaining: list[float | None] = []
        self.held = 0
        self.cancelled = 0
        self._channel = None

    async def GetInfo(self, request, context):
        if self.upstream is None:
            return model_pb2.ModelInfo(role=stats_pb2.ROLE_TARGET, model_name="fake")
        self._channel = self._channel or grpc.aio.insecure_channel(self.upstream)
        return await model_pb2_grpc.TargetModelStub(self._channel).GetInfo(request)

    async def Generate(self, request, context):
        self.requests.append(request)
        self.time_remaining.append(context.time_remaining())
        if self.fail is not None:
            await context.abort(self.fail, "fake failure before the first token")
        self._channel = self._channel or grpc.aio.insecure_channel(self.upstream)
        call = model_pb2_grpc.TargetModelStub(self._channel).Generate(request)
        sent = 0
        try:
            async for chunk in call:
                if self.lose_finish and chunk.finish_reason:
                    chunk.finish_reason = gen.FINISH_REASON_UNSPECIFIED
                    yield chunk
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "fake break before the finish")
                yield chunk
                sent += len(chunk.token_ids)
                if chunk.finish_reason:
                    return
                if self.break_after is not None and sent >= self.break_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "fake break mid-stream")
                if self.hold_after is not None and sent >= self.hold_after:
                    self.held += 1
                    await self.released.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            call.cancel()


class _FreezableStats(StatsServicer):
    """Load reports that stop while a ``freeze`` FakeTarget holds a stream (and are not released)."""

    def __init__(self, servicer: FakeTarget, report, interval_s: float) -> None:
        super().__init__(report, interval_s)
        self._servicer = servicer

    async def _reports(self, interval: float):
        fake = self._servicer
        while True:
            if not (fake.freeze and fake.held and not fake.released.is_set()):
                yield self._report()
            await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def fake_target(servicer: FakeTarget, provider: TracerProvider | None = None):
    server, port, health = new_server(BaseConfig(port=0), [SERVICE_NAMES["target"], SERVICE_NAMES["stats"]],
                                      provider or TracerProvider())
    model_pb2_grpc.add_TargetModelServicer_to_server(servicer, server)
    report = lambda: stats_pb2.LoadReport(role=stats_pb2.ROLE_TARGET, timestamp=time.time())  # noqa: E731
    stats_pb2_grpc.add_StatsServicer_to_server(_FreezableStats(servicer, report, 0.1), server)
    await server.start()
    await health.set(True)
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
        if servicer._channel is not None:
            await servicer._channel.close()


class _TargetInfo(model_pb2_grpc.TargetModelServicer):
    def __init__(self, info: model_pb2.ModelInfo) -> None:
        self.info = info

    async def GetInfo(self, request, context):
        return self.info


class _DraftInfo(model_pb2_grpc.DraftModelServicer):
    def __init__(self, info: model_pb2.ModelInfo) -> None:
        self.info = info

    async def GetInfo(self, request, context):
        return self.info


@contextlib.asynccontextmanager
async def bare_instance(role=stats_pb2.ROLE_TARGET, info: bool = True, info_role: int | None = None,
                        tokenizer_hash: str = ""):
    """A server with only the library's health servicer (no llmesh interceptors),
    Stats reporting ``role``, and the model service of ``role`` answering
    GetInfo only, as ``info_role`` (default: ``role``); ``info`` False: no
    model service at all."""
    from grpc_health.v1 import health

    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    report = lambda: stats_pb2.LoadReport(role=role, timestamp=time.time())  # noqa: E731
    stats_pb2_grpc.add_StatsServicer_to_server(StatsServicer(report, 0.1), server)
    if info:
        model_info = model_pb2.ModelInfo(role=role if info_role is None else info_role, model_name="bare",
                                         tokenizer_hash=tokenizer_hash)
        if role == stats_pb2.ROLE_DRAFT:
            model_pb2_grpc.add_DraftModelServicer_to_server(_DraftInfo(model_info), server)
        else:
            model_pb2_grpc.add_TargetModelServicer_to_server(_TargetInfo(model_info), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", SERVING)
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
