"""Small real gRPC servers standing in for the router and model instances (no tests here).

Shared by the monitor and scaler tests: a router that answers ListInstances
from a list the test edits and streams its own stats, and a model instance
whose stats counters grow at fixed rates.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from services.common.stubs import router_pb2, router_pb2_grpc, stats_pb2, stats_pb2_grpc
from tests.conftest import eventually  # noqa: F401 - re-exported for the monitor and scaler tests


async def _serve(servicers, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    for add, servicer in servicers:
        add(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


class _Stats(stats_pb2_grpc.StatsServicer):
    def __init__(self, report) -> None:
        self.report = report
        self.streams = 0

    async def Watch(self, request, context):
        self.streams += 1
        try:
            while True:
                yield self.report()
                await asyncio.sleep(request.interval_s or 1.0)
        finally:
            self.streams -= 1


class FakeInstance:
    """A model instance's Stats.Watch: counters grow at ``tokens_per_s`` and ``requests_per_s``."""

    def __init__(self, instance_id: str, role: int = stats_pb2.ROLE_TARGET, tokens_per_s: float = 0.0,
                 requests_per_s: float = 0.0, **fields) -> None:
        self.instance_id = instance_id
        self.role = role
        self.tokens_per_s = tokens_per_s
        self.requests_per_s = requests_per_s
        self.fields = fields
        self.started = time.time()
        self.stats = _Stats(self.report)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def report(self) -> stats_pb2.LoadReport:
        now = time.time()
        elapsed = now - self.started
        return stats_pb2.LoadReport(
            instance_id=self.instance_id, role=self.role, timestamp=now, window_s=10.0, max_batch_size=8,
            tokens_generated_total=int(self.tokens_per_s * elapsed),
            requests_total=int(self.requests_per_s * elapsed),
            utilization_source=stats_pb2.UTILIZATION_SOURCE_ENGINE_BUSY, **self.fields)

    async def start(self) -> "FakeInstance":
        self.server, self.port = await _serve([(stats_pb2_grpc.add_StatsServicer_to_server, self.stats)])
        return self

    async def stop(self) -> None:
        await self.server.stop(0)


class FakeRouter(router_pb2_grpc.RouterServicer):
    """Router.ListInstances from ``self.instances`` (edit it freely) and the router's own stats."""

    def __init__(self) -> None:
        self.instances: list[router_pb2.InstanceStatus] = []
        self.list_calls = 0
        #: Seconds ListInstances takes (a router frozen or overloaded).
        self.list_delay_s = 0.0
        self.stats = _Stats(lambda: stats_pb2.LoadReport(instance_id="router@fake", role=stats_pb2.ROLE_ROUTER,
                                                         timestamp=time.time()))
        self.server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, instance_id: str, address: str, role: int = stats_pb2.ROLE_TARGET, pool: str = "default",
            healthy: bool = True, state: int = router_pb2.INSTANCE_STATE_ACTIVE) -> router_pb2.InstanceStatus:
        status = router_pb2.InstanceStatus(
            spec=router_pb2.InstanceSpec(id=instance_id, address=address, role=role, pool=pool), state=state,
            health=router_pb2.INSTANCE_HEALTH_SERVING if healthy else router_pb2.INSTANCE_HEALTH_NOT_SERVING)
        self.instances.append(status)
        return status

    def remove(self, instance_id: str) -> None:
        self.instances = [i for i in self.instances if i.spec.id != instance_id]

    def get(self, instance_id: str) -> router_pb2.InstanceStatus | None:
        return next((i for i in self.instances if i.spec.id == instance_id), None)

    async def ListInstances(self, request, context):
        self.list_calls += 1
        if self.list_delay_s:
            await asyncio.sleep(self.list_delay_s)
        listed = [i for i in self.instances if not request.pool or i.spec.pool == request.pool]
        return router_pb2.ListInstancesResponse(instances=listed, policy="fake")

    async def RegisterInstance(self, request, context):
        self.remove(request.instance.id)
        status = router_pb2.InstanceStatus(spec=request.instance, state=router_pb2.INSTANCE_STATE_ACTIVE,
                                           health=router_pb2.INSTANCE_HEALTH_SERVING)
        self.instances.append(status)
        return router_pb2.RegisterInstanceResponse(instance=status)

    async def DrainInstance(self, request, context):
        status = self.get(request.id)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no instance with id {request.id!r}")
        status.state = router_pb2.INSTANCE_STATE_DRAINING
        return router_pb2.DrainInstanceResponse(instance=status)

    async def DeregisterInstance(self, request, context):
        if self.get(request.id) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no instance with id {request.id!r}")
        self.remove(request.id)
        return router_pb2.DeregisterInstanceResponse()

    async def start(self, port: int = 0) -> "FakeRouter":
        self.server, self.port = await _serve([(router_pb2_grpc.add_RouterServicer_to_server, self),
                                               (stats_pb2_grpc.add_StatsServicer_to_server, self.stats)], port)
        return self

    async def stop(self) -> None:
        await self.server.stop(0)
