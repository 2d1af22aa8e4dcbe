"""The scaler's view of the router's registry: one ListInstances per question asked."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from scaler import codec
from scaler.state import ScalerState
from services.common.stubs import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


class RouterFleet:
    """Refreshes ``state``'s fleet from the router; a failure keeps the last list (marked stale)."""

    def __init__(self, channel: grpc.aio.Channel, state: ScalerState, timeout_s: float,
                 clock: Callable[[], float]) -> None:
        self._stub = router_pb2_grpc.RouterStub(channel)
        self._state = state
        self._timeout_s = timeout_s
        self._clock = clock

    async def refresh(self) -> None:
        try:
            reply = await self._stub.ListInstances(router_pb2.ListInstancesRequest(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            if not self._state.fleet_error:
                log.warning("router: ListInstances failed (%s: %s)", exc.code().name, exc.details())
            self._state.fleet_failed(exc.code().name)
            return
        self._state.set_fleet([codec.instance_of(s) for s in reply.instances if s.spec.address], self._clock())
