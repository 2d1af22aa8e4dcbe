"""Small real servers and a backend standing in for the scaler's neighbours (no tests here).

A fake target answers Health (SERVING after a delay) and TargetModel.Generate;
the fake backend "starts" one per instance in this process; a fake monitor
answers GetThroughput from a function the test sets.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from scaler.backends import Backend, BackendError, LaunchSpec, Launched
from scaler.policy import HostLimit
from services.common.stubs import generation_pb2, model_pb2_grpc, monitor_pb2, monitor_pb2_grpc


class FakeTarget(model_pb2_grpc.TargetModelServicer):
    def __init__(self, instance_id: str, ready_after_s: float = 0.0) -> None:
        self.instance_id = instance_id
        self.ready_after_s = ready_after_s
        self.generations: list[generation_pb2.GenerateRequest] = []
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.stopped = False

    async def Generate(self, request, context):
        self.generations.append(request)
        yield generation_pb2.GenerateChunk(token_ids=[1] * request.sampling.max_new_tokens,
                                           finish_reason=generation_pb2.FINISH_REASON_LENGTH)

    async def start(self) -> "FakeTarget":
        self.server = grpc.aio.server()
        model_pb2_grpc.add_TargetModelServicer_to_server(self, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()

        async def ready() -> None:
            await asyncio.sleep(self.ready_after_s)
            await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

        self._ready = asyncio.create_task(ready())
        return self

    async def stop(self) -> None:
        self.stopped = True
        self._ready.cancel()
        await self.server.stop(0)


class FakeBackend(Backend):
    """Starts a :class:`FakeTarget` per instance; ``fail_with`` makes starts fail, ``die(id)`` kills one;
    ``limit`` is its :meth:`max_targets` (None: unbounded, as Docker and Kubernetes are)."""

    name = "fake"

    def __init__(self, ready_after_s: float = 0.0, limit: HostLimit | None = None) -> None:
        self.ready_after_s = ready_after_s
        self.limit = limit
        self.fail_with: str | None = None
        self.targets: dict[str, FakeTarget] = {}
        self.dead: dict[str, str] = {}
        self.stopped: list[str] = []

    async def start(self, spec: LaunchSpec) -> Launched:
        if self.fail_with:
            raise BackendError(self.fail_with)
        target = await FakeTarget(spec.instance_id, self.ready_after_s).start()
        self.targets[spec.instance_id] = target
        return Launched(f"127.0.0.1:{target.port}", f"fake {spec.instance_id}", spec.instance_id)

    async def stop(self, launched: Launched, grace_s: float) -> None:
        target = self.targets.pop(launched.handle, None)
        if target is not None:
            await target.stop()
            self.stopped.append(launched.handle)

    def problem(self, launched: Launched) -> str | None:
        return self.dead.get(launched.handle)

    def max_targets(self) -> HostLimit | None:
        return self.limit

    async def die(self, instance_id: str) -> None:
        self.dead[instance_id] = "exited with code 1"
        await self.targets[instance_id].stop()

    async def close(self, grace_s: float) -> None:
        for target in list(self.targets.values()):
            await target.stop()
        self.targets.clear()


class FakeMonitor(monitor_pb2_grpc.MonitorServicer):
    """GetThroughput from ``self.answer(window_s, pool)`` (a GetThroughputResponse)."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def GetThroughput(self, request, context):
        return self.answer(request.window_s, request.scope.pool)

    async def start(self) -> "FakeMonitor":
        self.server = grpc.aio.server()
        monitor_pb2_grpc.add_MonitorServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop(0)


def throughput(tokens_per_second: float, instances: dict[str, float] | None = None, *, in_flight: int = 4,
               running: int = 4, saturation: float = 1.0, window_s: float = 1.0) -> monitor_pb2.GetThroughputResponse:
    """A pool's answer: the aggregate and each instance's tokens/s."""
    reply = monitor_pb2.GetThroughputResponse(metrics=monitor_pb2.ThroughputMetrics(
        window_s=window_s, tokens_per_second=tokens_per_second, in_flight=in_flight, running=running,
        instances=max(1, len(instances or {}))))
    for key, tps in (instances or {}).items():
        reply.per_instance[key].CopyFrom(monitor_pb2.ThroughputMetrics(window_s=window_s, tokens_per_second=tps,
                                                                       saturation=saturation, instances=1))
    return reply
