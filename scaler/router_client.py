"""The scaler's calls to the router: its registry (ListInstances) and membership changes."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from scaler import codec
from scaler.state import PoolMember, ScalerState
from services.common.stubs import router_pb2, router_pb2_grpc, stats_pb2

log = logging.getLogger(__name__)


class RouterClient:
    """The scaler's calls to the router: refreshes ``state``'s listing of the router's
    instances (a failure keeps the last list, marked stale) and changes membership.
    ``metadata`` goes with every call: the admin credential (``bearer_metadata(admin_token)``)
    that RegisterInstance, DrainInstance and DeregisterInstance need."""

    def __init__(self, channel: grpc.aio.Channel, state: ScalerState, timeout_s: float,
                 clock: Callable[[], float], labels: dict[str, str] | None = None,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._stub = router_pb2_grpc.RouterStub(channel)
        self._metadata = metadata or None
        self._state = state
        self._timeout_s = timeout_s
        self._clock = clock
        self._labels = labels or {}
        #: Whether the router answered ListInstances once (before: it is starting, and a failure is not news).
        self._answered = False

    async def refresh(self, timeout_s: float | None = None) -> bool:
        """True when the router answered (within ``timeout_s``, default the client's timeout)."""
        try:
            reply = await self._stub.ListInstances(router_pb2.ListInstancesRequest(),
                                                   timeout=self._timeout_s if timeout_s is None else timeout_s,
                                                   metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if not self._state.listing_error:
                if self._answered:
                    log.warning("router: ListInstances failed (%s: %s)", exc.code().name, exc.details())
                else:  # never answered yet: starting with the suite, not failing
                    log.info("router not answering yet (%s); waiting for it", exc.code().name)
            self._state.listing_failed(exc.code().name)
            return False
        self._state.set_listing([codec.instance_of(s) for s in reply.instances if s.spec.address], self._clock())
        self._answered = True
        return True

    async def instance(self, instance_id: str, pool: str) -> PoolMember | None:
        """The router's current view of one instance (None: not registered)."""
        reply = await self._stub.ListInstances(router_pb2.ListInstancesRequest(pool=pool), timeout=self._timeout_s,
                                               metadata=self._metadata)
        for status in reply.instances:
            if status.spec.id == instance_id:
                return codec.instance_of(status)
        return None

    async def register(self, instance_id: str, address: str, pool: str) -> None:
        spec = router_pb2.InstanceSpec(id=instance_id, address=address, role=stats_pb2.ROLE_TARGET, pool=pool,
                                       labels=self._labels)
        await self._stub.RegisterInstance(router_pb2.RegisterInstanceRequest(instance=spec),
                                          timeout=self._timeout_s, metadata=self._metadata)

    async def drain(self, instance_id: str) -> bool:
        """False when the router does not know the instance (nothing to drain)."""
        try:
            await self._stub.DrainInstance(router_pb2.DrainInstanceRequest(id=instance_id), timeout=self._timeout_s,
                                           metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False
        return True

    async def deregister(self, instance_id: str) -> None:
        """Removes the instance; one the router no longer knows is already gone."""
        try:
            await self._stub.DeregisterInstance(router_pb2.DeregisterInstanceRequest(id=instance_id),
                                                timeout=self._timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
