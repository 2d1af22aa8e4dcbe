"""Router RPCs: decode, call the upstreams or the forwarder, encode.

Errors, an upstream status relayed as it came included, become status codes
in the server's error interceptor; the client token and the admin boundary
are checked before a call gets here (services.common.access).
"""

from __future__ import annotations

from router import codec
from router.upstreams import Upstreams
from router.forwarder import Forwarder
from services.common.errors import InvalidArgument
from services.common.stubs import router_pb2, router_pb2_grpc


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, upstreams: Upstreams, forwarder: Forwarder) -> None:
        self.upstreams = upstreams
        self.forwarder = forwarder

    async def Generate(self, request, context):
        # Written with context.write rather than as a generator: each chunk
        # goes out as it comes, through no wrapper layer (interceptors included).
        await self.forwarder.generate(request, context.time_remaining, context.write)

    async def Complete(self, request, context):
        completion = codec.CompletionBuilder()

        async def add(chunk) -> None:
            completion.add(chunk)

        await self.forwarder.generate(request, context.time_remaining, add)
        return completion.result()

    async def RegisterInstance(self, request, context):
        if not request.HasField("instance"):
            raise InvalidArgument("instance", "must be set")
        inst = self.upstreams.register(codec.spec_of(request.instance))
        return router_pb2.RegisterInstanceResponse(instance=codec.status_pb(inst, self.upstreams.snapshot()))

    async def DrainInstance(self, request, context):
        inst = self.upstreams.drain(request.id)
        return router_pb2.DrainInstanceResponse(instance=codec.status_pb(inst, self.upstreams.snapshot()))

    async def DeregisterInstance(self, request, context):
        self.upstreams.deregister(request.id)
        return router_pb2.DeregisterInstanceResponse()

    async def ListInstances(self, request, context):
        role = codec.role_filter(request.role)
        snapshot = self.upstreams.snapshot()
        instances = self.upstreams.registry.select(role, request.pool or None)
        f = self.forwarder
        stats = codec.router_stats_pb(f.cache, f.admission, f.in_flight, f.metrics.counters["rejected_total"],
                                      self.upstreams.pools(), self.upstreams.priority_pools)
        return router_pb2.ListInstancesResponse(instances=[codec.status_pb(i, snapshot) for i in instances],
                                                policy=self.upstreams.config.policy.value, router=stats)
