"""Per-instance loops that keep the registry's view of an instance current.

Two long-lived server streams per instance: ``grpc.health.v1.Health/Watch``
(an update on every change; a broken stream marks the instance unreachable at
once, which is how a killed instance is noticed within milliseconds) and
``llmesh.v1.Stats/Watch`` (a load report every ``load_interval_s``). Each
reconnects with exponential backoff when the instance goes away. An instance
whose Health/Watch fails (UNIMPLEMENTED, or an error) is polled with
``Health/Check`` every ``health_interval_s`` instead; a broken stats stream
then triggers an immediate check, so a killed instance is still noticed at
once.

Whenever the instance turns SERVING (newly registered, or back after its
health left SERVING), the watcher asks its ``GetInfo`` as the role it was
registered with (``TargetModel.GetInfo`` or ``DraftModel.GetInfo``) and the
registry makes it routable only when it answers as that role: another kind
of server (a monitor registered as a target answers UNIMPLEMENTED) is shown
NOT_SERVING with the reason, and gets no request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router import codec
from router.failover import Fault, fault_of, short_reason
from router.kv_index import KvIndex
from router.registry import Health, Identity, Registry, Role
from services.common.waits import wait_event
from services.common.backoff import Backoff
from services.common.stubs import model_pb2, model_pb2_grpc, stats_pb2, stats_pb2_grpc

log = logging.getLogger(__name__)

_HEALTH = {
    health_pb2.HealthCheckResponse.SERVING: (Health.SERVING, ""),
    health_pb2.HealthCheckResponse.NOT_SERVING: (Health.NOT_SERVING, "NOT_SERVING"),
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: (Health.NOT_SERVING, "health service unknown"),
    health_pb2.HealthCheckResponse.UNKNOWN: (Health.UNKNOWN, "health UNKNOWN"),
}


#: Health/Watch answers these when the instance cannot stream health; Check is used instead.
_NO_WATCH = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})

#: Longest wait for a GetInfo answer (seconds); a model service answers it from memory.
GET_INFO_TIMEOUT_S = 5.0


class InstanceWatcher:
    """The health and stats subscriptions of one instance."""

    def __init__(self, instance_id: str, channel: grpc.aio.Channel, registry: Registry,
                 load_interval_s: float, health_interval_s: float, reconnect_min_s: float,
                 reconnect_max_s: float, clock: Callable[[], float] = time.monotonic,
                 kv_index: KvIndex | None = None, kv_interval_s: float = 0.1) -> None:
        """``kv_index``: follow the instance's Stats/WatchKvEvents into it (kv_aware routing)."""
        self.instance_id = instance_id
        self._kv_index = kv_index
        self._kv_interval = kv_interval_s
        self._health = health_pb2_grpc.HealthStub(channel)
        self._stats = stats_pb2_grpc.StatsStub(channel)
        self._models = {Role.TARGET: model_pb2_grpc.TargetModelStub(channel),
                        Role.DRAFT: model_pb2_grpc.DraftModelStub(channel)}
        self._verify_task: asyncio.Task | None = None
        self._registry = registry
        self._load_interval = load_interval_s
        self._health_interval = health_interval_s
        self._backoff = (reconnect_min_s, reconnect_max_s)
        self._clock = clock
        self._tasks: list[asyncio.Task] = []
        self._health_task: asyncio.Task | None = None
        #: False once the instance's Health/Watch turned out not to work: poll Health/Check instead.
        self.watch_health = True
        #: Set when the instance turns SERVING, to cut the stats loop's backoff short.
        self._became_serving = asyncio.Event()

    def start(self) -> None:
        self._health_task = asyncio.create_task(self._health_loop(), name=f"health:{self.instance_id}")
        self._tasks = [self._health_task,
                       asyncio.create_task(self._stats_loop(), name=f"stats:{self.instance_id}")]
        if self._kv_index is not None:
            self._tasks.append(asyncio.create_task(self._kv_loop(), name=f"kv:{self.instance_id}"))

    def recheck(self) -> None:
        """Looks at the instance's health again now (a call to it failed): a
        fresh Watch or Check answers with the current status at once."""
        if self._health_task is None or self._health_task.done():
            return
        self._health_task.cancel()
        self._health_task = asyncio.create_task(self._health_loop(), name=f"health:{self.instance_id}")
        self._tasks = [t for t in self._tasks if not t.done()] + [self._health_task]

    def verify(self) -> None:
        """Asks the instance's GetInfo now (it may be another kind of server
        than registered), unless that is under way already."""
        if self._verify_task is not None and not self._verify_task.done():
            return
        self._verify_task = asyncio.create_task(self._verify(), name=f"verify:{self.instance_id}")
        self._tasks = [t for t in self._tasks if not t.done()] + [self._verify_task]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        if wake is None:
            await asyncio.sleep(seconds)
            return
        await wait_event(wake, seconds)

    def _observe(self, status: int) -> Health:
        health, problem = _HEALTH.get(status, (Health.UNKNOWN, "health UNKNOWN"))
        was = self._registry.find(self.instance_id)
        was_serving = was is not None and was.health is Health.SERVING
        self._registry.set_health(self.instance_id, health, problem)
        if health is Health.SERVING and not was_serving:
            self._became_serving.set()
        if health is Health.SERVING and was is not None and was.identity is Identity.UNCHECKED:
            self.verify()
        return health

    async def _verify(self) -> None:
        """GetInfo as the registered role, until it answers (or proves the
        instance the wrong kind of server) while the instance is SERVING;
        transient errors are retried with backoff."""
        backoff = Backoff(*self._backoff)
        while True:
            inst = self._registry.find(self.instance_id)
            if inst is None or inst.health is not Health.SERVING or inst.identity is not Identity.UNCHECKED:
                return
            role = inst.spec.role
            try:
                info = await self._models[role].GetInfo(model_pb2.GetInfoRequest(), timeout=GET_INFO_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                problem = f"{role.value}-model GetInfo answered {code} ({short_reason(exc.details() or code)})"
                if fault_of(code) is Fault.WRONG_KIND:  # it serves no such RPC: another kind of server
                    log.warning("%s is not a %s-model service: %s", self.instance_id, role.value, problem)
                    self._registry.set_wrong_kind(self.instance_id, problem)
                    return
                log.info("%s: %s; asking again", self.instance_id, problem)
                self._registry.set_identity_problem(self.instance_id, problem)
                await self._sleep(backoff.next())
                continue
            confirmed = self._registry.set_identity(self.instance_id, codec.identity_of(info))
            if confirmed is not None and confirmed.identity is Identity.WRONG:
                log.warning("%s is not routable as a %s: %s", self.instance_id, role.value,
                            confirmed.identity_problem)
            return

    async def _health_loop(self) -> None:
        backoff = Backoff(*self._backoff)
        while True:
            problem = await (self._watch_health(backoff) if self.watch_health else self._check_health())
            if problem is None:  # a Check answered: poll again after the interval
                backoff.reset()
                await self._sleep(self._health_interval)
                continue
            if not problem:  # Watch does not work here: switch to Check at once
                continue
            self._registry.set_health(self.instance_id, Health.NOT_SERVING, problem)
            await self._sleep(backoff.next())

    async def _watch_health(self, backoff: Backoff) -> str:
        """Follows Health/Watch until it breaks; returns why ("" to fall back to Check)."""
        call = self._health.Watch(health_pb2.HealthCheckRequest(service=""))
        try:
            async for reply in call:
                if self._observe(reply.status) is Health.SERVING:
                    backoff.reset()
            return "unreachable (health stream ended)"
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _NO_WATCH:
                log.info("%s: Health/Watch answers %s; polling Health/Check instead", self.instance_id,
                         exc.code().name)
                self.watch_health = False
                return ""
            return f"unreachable ({short_reason(exc.details() or exc.code().name)})"
        finally:
            call.cancel()

    async def _check_health(self) -> str | None:
        """One Health/Check; None when it answered, else why not."""
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""),
                                             timeout=max(1.0, 2 * self._health_interval))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return "no grpc.health.v1 service"
            return f"unreachable ({short_reason(exc.details() or exc.code().name)})"
        self._observe(reply.status)
        return None

    async def _kv_loop(self) -> None:
        """Follows the instance's KV events into the index; while the stream is
        down the instance is forgotten (a reconnect starts with a snapshot).
        Ends for good on UNIMPLEMENTED (a service without a KV cache)."""
        backoff = Backoff(*self._backoff)
        index = self._kv_index
        while True:
            call = self._stats.WatchKvEvents(stats_pb2.WatchKvEventsRequest(interval_s=self._kv_interval))
            try:
                async for ev in call:
                    index.apply(self.instance_id, ev.snapshot, ev.stored, ev.removed, ev.block_size)
                    backoff.reset()
            except grpc.aio.AioRpcError as exc:
                log.debug("KV events of %s: %s", self.instance_id, exc.code().name)
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    index.forget(self.instance_id)
                    return
            finally:
                call.cancel()
                index.forget(self.instance_id)
            await self._sleep(backoff.next())

    async def _stats_loop(self) -> None:
        backoff = Backoff(*self._backoff)
        while True:
            self._became_serving.clear()
            call = self._stats.Watch(stats_pb2.WatchStatsRequest(interval_s=self._load_interval))
            try:
                async for report in call:
                    self._registry.record_load(self.instance_id, codec.load_of(report), self._clock())
                    backoff.reset()
            except grpc.aio.AioRpcError as exc:
                log.debug("stats of %s: %s", self.instance_id, exc.code().name)
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    self.recheck()  # the connection went: have health looked at now, not at the next poll
            finally:
                call.cancel()
            await self._sleep(backoff.next(), self._became_serving)
