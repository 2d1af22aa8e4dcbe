"""Router RPCs: decode, call the fleet or the forwarder, encode.

Errors, an upstream status relayed as it came included, become status codes
in the server's error interceptor.
"""

from __future__ import annotations

from router import codec
from router.fleet import Fleet
from router.forwarder import Forwarder
from services.common.errors import InvalidArgument
from services.common.stubs import router_pb2, router_pb2_grpc


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, fleet: Fleet, forwarder: Forwarder) -> None:
        self.fleet = fleet
        self.forwarder = forwarder

    async def Generate(self, request, context):
        async for chunk in self.forwarder.generate(request, context.time_remaining):
            yield chunk

    async def Complete(self, request, context):
        collector = codec.Collector()
        async for chunk in self.forwarder.generate(request, context.time_remaining):
            collector.add(chunk)
        return collector.result()

    async def RegisterInstance(self, request, context):
        if not request.HasField("instance"):
            raise InvalidArgument("instance", "must be set")
        inst = self.fleet.register(codec.spec_of(request.instance))
        return router_pb2.RegisterInstanceResponse(instance=codec.status_pb(inst, self.fleet.snapshot()))

    async def DrainInstance(self, request, context):
        inst = self.fleet.drain(request.id)
        return router_pb2.DrainInstanceResponse(instance=codec.status_pb(inst, self.fleet.snapshot()))

    async def DeregisterInstance(self, request, context):
        self.fleet.deregister(request.id)
        return router_pb2.DeregisterInstanceResponse()

    async def ListInstances(self, request, context):
        role = codec.role_filter(request.role)
        snapshot = self.fleet.snapshot()
        instances = self.fleet.registry.select(role, request.pool or None)
        return router_pb2.ListInstancesResponse(instances=[codec.status_pb(i, snapshot) for i in instances],
                                                policy=self.fleet.config.policy.value)
