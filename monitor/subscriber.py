"""The monitor's I/O loops: follow the router's registry, subscribe to everyone's stats.

One task lists the router's instances every ``list_interval_s``; one task per
instance (and one for the router itself) holds a ``Stats/Watch`` stream open
and writes each report into the store. A lost stream or a failed call is
retried with exponential backoff and jitter; an instance that leaves the
router's list has its stream cancelled and its reports dropped. When the
router itself cannot be reached, the instances already known stay watched:
a router restart must not blind the monitor.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from monitor import codec
from monitor.store import InstanceInfo, ReportStore
from services.common.load import Role
from services.common.backoff import Backoff
from services.common.stubs import router_pb2, router_pb2_grpc, stats_pb2, stats_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class _Watch:
    address: str
    task: asyncio.Task


class StatsSubscriber:
    """Keeps ``store`` filled with the reports of every instance the router lists (and the
    router's own). Its tasks run on the event loop; ``clock`` (default ``time.time``) stamps
    ``received_at``."""

    def __init__(self, router_address: str, store: ReportStore, *, watch_interval_s: float,
                 list_interval_s: float, rpc_timeout_s: float, reconnect_initial_s: float,
                 reconnect_max_s: float, channel_factory: Callable[[str], grpc.aio.Channel],
                 clock: Callable[[], float] = time.time) -> None:
        self.router_address = router_address
        self.store = store
        self.watch_interval_s = watch_interval_s
        self.list_interval_s = list_interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self._backoff = lambda: Backoff(reconnect_initial_s, reconnect_max_s, random.Random())
        self._channel_factory = channel_factory
        self._clock = clock
        self._watches: dict[str, _Watch] = {}
        self._tasks: list[asyncio.Task] = []
        self._router_key: str | None = None

    @property
    def watched(self) -> dict[str, str]:
        """Key -> address of every instance with a stats subscription."""
        return {k: w.address for k, w in self._watches.items()}

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._list_loop(), name="monitor-list"),
                       asyncio.create_task(self._watch_loop(None, self.router_address), name="monitor-watch-router")]

    async def stop(self) -> None:
        tasks = self._tasks + [w.task for w in self._watches.values()]
        self._tasks, self._watches = [], {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the registry -------------------------------------------------------
    async def _list_loop(self) -> None:
        backoff = self._backoff()
        channel = self._channel_factory(self.router_address)
        stub = router_pb2_grpc.RouterStub(channel)
        failing = False
        answered = False  # a router that never answered yet is starting (the suite starts together), not failing
        try:
            while True:
                try:
                    reply = await stub.ListInstances(router_pb2.ListInstancesRequest(), timeout=self.rpc_timeout_s)
                except grpc.aio.AioRpcError as exc:
                    if failing:
                        log.debug("router %s: ListInstances failed (%s: %s); retrying", self.router_address,
                                  exc.code().name, exc.details())
                    elif answered:
                        log.warning("router %s: ListInstances failed (%s: %s); retrying", self.router_address,
                                    exc.code().name, exc.details())
                    else:
                        log.info("router %s not answering yet (%s); waiting for it", self.router_address,
                                 exc.code().name)
                    failing = True
                    await asyncio.sleep(backoff.next())
                    continue
                if failing:
                    log.info("router %s: listing instances%s", self.router_address, " again" if answered else "")
                failing, answered = False, True
                backoff.reset()
                self.sync([codec.instance_of(s) for s in reply.instances])
                await asyncio.sleep(self.list_interval_s)
        finally:
            await channel.close()

    def sync(self, infos: list[InstanceInfo]) -> None:
        """Follows the router's list: new instances are watched, gone ones dropped."""
        infos = [i for i in infos if i.address]
        _, removed = self.store.set_listed(infos, self._clock())
        for key in removed:
            self._unwatch(key)
            log.info("instance %s left the router's list; no longer watched", key)
        for info in infos:
            current = self._watches.get(info.key)
            if current is not None and current.address == info.address:
                continue
            if current is not None:  # re-registered at another address
                self._unwatch(info.key)
            task = asyncio.create_task(self._watch_loop(info.key, info.address), name=f"monitor-watch-{info.key}")
            self._watches[info.key] = _Watch(info.address, task)
            log.info("watching %s (%s, pool %s) at %s", info.key, info.role.value, info.pool, info.address)

    def _unwatch(self, key: str) -> None:
        watch = self._watches.pop(key, None)
        if watch is not None:
            watch.task.cancel()

    # -- the stats streams --------------------------------------------------
    async def _watch_loop(self, key: str | None, address: str) -> None:
        """Streams ``address``'s reports into the store; ``key`` None means the router itself."""
        backoff = self._backoff()
        channel = self._channel_factory(address)
        stub = stats_pb2_grpc.StatsStub(channel)
        request = stats_pb2.WatchStatsRequest(interval_s=self.watch_interval_s)
        failing = False
        try:
            while True:
                try:
                    async for pb in stub.Watch(request):
                        self._keep(key, address, pb)
                        if failing:
                            log.info("stats of %s flow again", key or address)
                        failing = False
                        backoff.reset()
                    reason = "the stream ended"
                except grpc.aio.AioRpcError as exc:
                    reason = f"{exc.code().name}: {exc.details()}"
                except Exception as exc:  # noqa: BLE001 - a bad report must not end the watch for good
                    log.warning("stats of %s: unexpected error", key or address, exc_info=exc)
                    reason = f"unexpected {type(exc).__name__}"
                (log.debug if failing else log.info)("stats of %s at %s: %s; reconnecting",
                                                     key or "the router", address, reason)
                failing = True
                await asyncio.sleep(backoff.next())
        finally:
            await channel.close()

    def _keep(self, key: str | None, address: str, pb: stats_pb2.LoadReport) -> None:
        report = codec.report_of(pb, self._clock())
        if key is None:
            key = pb.instance_id or f"router@{address}"
            if key != self._router_key:
                if self._router_key is not None:
                    self.store.remove(self._router_key)
                self._router_key = key
                self.store.upsert(InstanceInfo(key, address, Role.ROUTER, pool="", listed=False))
        self.store.add(key, report)
