"""Scaler RPCs: refresh the listing of the router's instances, apply the change, wake the control loop, encode."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from scaler import codec
from scaler.controller import Controller
from scaler.router_client import RouterClient
from scaler.policy import checked
from scaler.state import ScalerState
from services.common.errors import InvalidArgument
from services.common.streams import until
from services.common.stubs import scaler_pb2, scaler_pb2_grpc


#: Longest wait for the router's listing before a reply (seconds): past it the reply shows the last listing and
#: says how old it is. A frozen router held GetStatus for the whole client timeout (2 s), which `llmesh status`
#: then reported as the scaler's DEADLINE_EXCEEDED, though the scaler served.
REPLY_REFRESH_S = 0.5


class ScalerServicer(scaler_pb2_grpc.ScalerServicer):
    def __init__(self, state: ScalerState, router: RouterClient, controller: Controller,
                 clock: Callable[[], float], ending: asyncio.Event | None = None) -> None:
        """``ending``: set when the service shuts down; WatchEvents streams end then."""
        self.ending = ending or asyncio.Event()
        self.state = state
        self.router = router
        self.controller = controller
        self.clock = clock

    async def GetStatus(self, request, context):
        await self.router.refresh(REPLY_REFRESH_S)
        return scaler_pb2.GetStatusResponse(pools=[codec.pool_pb(v) for v in self.state.pools(self.clock())],
                                            backend=self.state.backend)

    async def SetPolicy(self, request, context):
        pool = codec.pool_name(request.pool)
        if not request.HasField("policy"):
            raise InvalidArgument("policy", "must be set")
        policy = checked(codec.policy_of(request.policy))
        await self.router.refresh(REPLY_REFRESH_S)
        view = self.state.set_policy(pool, policy, self.clock())
        self.controller.wake()
        return scaler_pb2.SetPolicyResponse(pool=codec.pool_pb(view))

    async def ScaleTo(self, request, context):
        pool = codec.pool_name(request.pool)
        await self.router.refresh(REPLY_REFRESH_S)
        view = self.state.scale_to(pool, request.instances, self.clock())
        self.controller.wake()
        return scaler_pb2.ScaleToResponse(pool=codec.pool_pb(view))

    async def GetHistory(self, request, context):
        pool, since = codec.pool_filter(request.pool), codec.since_of(request.since)
        return scaler_pb2.GetHistoryResponse(events=[codec.event_pb(e) for e in self.state.history(pool, since)])

    async def WatchEvents(self, request, context):
        pool = codec.pool_filter(request.pool)
        if pool:
            self.state.check_known(pool, "WatchEvents watches a pool the scaler knows", recorded=True)
        async for event in until(self.ending, self.state.watch(pool)):
            yield codec.event_pb(event)
