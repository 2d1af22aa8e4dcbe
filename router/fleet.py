"""The registry with its connections: one channel and one watcher per instance.

Registering an instance opens its channel and starts its watcher;
deregistering cancels the watcher and closes the channel once the requests
running on it have finished (or the grace period is over).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

import grpc
from opentelemetry.sdk.trace import TracerProvider

from router import policy
from router.config import RouterConfig
from router.registry import Instance, InstanceSpec, Registry, Role
from router.watcher import InstanceWatcher
from services.common import telemetry
from services.common.server import insecure_channel

log = logging.getLogger(__name__)


def open_channel(address: str, provider: TracerProvider | None, reconnect_max_s: float) -> grpc.aio.Channel:
    """Like ``services.common.server.insecure_channel`` (trace context
    propagates), with reconnection backoff bounded so that a restarted
    instance is reachable again within ``reconnect_max_s``."""
    backoff_ms = max(100, int(reconnect_max_s * 1000))
    return insecure_channel(address, provider, options=[("grpc.initial_reconnect_backoff_ms", 100),
                                                        ("grpc.min_reconnect_backoff_ms", 100),
                                                        ("grpc.max_reconnect_backoff_ms", backoff_ms)])


class Fleet:
    """Instances, their channels and watchers, and the routing decision."""

    def __init__(self, config: RouterConfig, provider: TracerProvider | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.provider = provider
        self.clock = clock
        self.registry = Registry(config.eject_after_failures, config.eject_for_s)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._watchers: dict[str, InstanceWatcher] = {}
        self._closing: set[asyncio.Task] = set()
        self._sequence = itertools.count()

    # -- membership ------------------------------------------------------------
    def register(self, spec: InstanceSpec) -> Instance:
        inst, replaced = self.registry.upsert(spec)
        if replaced is not None:
            self._disconnect(replaced.id)
        if inst.id not in self._channels:
            channel = open_channel(spec.address, self.provider, self.config.reconnect_max_s)
            c = self.config
            watcher = InstanceWatcher(inst.id, channel, self.registry, c.load_interval_s, c.health_interval_s,
                                      c.reconnect_min_s, c.reconnect_max_s, self.clock)
            self._channels[inst.id], self._watchers[inst.id] = channel, watcher
            watcher.start()
            log.info("registered %s %s at %s (pool %s)", spec.role.value, inst.id, spec.address, spec.pool)
        return inst

    def deregister(self, instance_id: str) -> Instance:
        inst = self.registry.remove(instance_id)
        self._disconnect(instance_id)
        log.info("deregistered %s", instance_id)
        return inst

    def drain(self, instance_id: str) -> Instance:
        inst = self.registry.drain(instance_id)
        log.info("draining %s", instance_id)
        return inst

    def _disconnect(self, instance_id: str) -> None:
        channel = self._channels.pop(instance_id, None)
        watcher = self._watchers.pop(instance_id, None)
        if channel is None or watcher is None:
            return

        async def close() -> None:
            await watcher.stop()
            await channel.close(grace=self.config.grace_period_s)

        task = asyncio.create_task(close(), name=f"close:{instance_id}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Cancels every watcher and closes every channel now."""
        for instance_id in list(self._channels):
            watcher = self._watchers.pop(instance_id)
            channel = self._channels.pop(instance_id)
            await watcher.stop()
            await channel.close(grace=None)
        await asyncio.gather(*self._closing, return_exceptions=True)

    # -- routing ---------------------------------------------------------------
    def channel(self, instance_id: str) -> grpc.aio.Channel:
        return self._channels[instance_id]

    def suspect(self, instance_id: str) -> None:
        """A call to the instance failed: have its health looked at again now."""
        watcher = self._watchers.get(instance_id)
        if watcher is not None:
            watcher.recheck()

    def next_sequence(self) -> int:
        return next(self._sequence)

    def snapshot(self, sequence: int = 0, exclude: frozenset[str] = frozenset()) -> policy.Snapshot:
        now = self.clock()
        self.registry.readmit(now)
        return policy.Snapshot(now=now, stale_after_s=self.config.stale_after_s, sequence=sequence, exclude=exclude)

    def choose(self, role: Role, pool: str, sequence: int, exclude: frozenset[str] = frozenset()) -> Instance | None:
        snapshot = self.snapshot(sequence, exclude)
        return policy.choose(self.config.policy, self.registry.select(role, pool), snapshot)

    def why_none(self, role: Role, pool: str, exclude: frozenset[str] = frozenset()) -> str:
        """Why no instance of the role and pool can take a request, instance by instance."""
        snapshot = self.snapshot()
        instances = self.registry.select(role, pool)
        if not instances:
            return f"no {role.value} instance registered in pool {pool!r}"
        states = ", ".join(
            f"{i.id} already tried" if i.id in exclude and i.routable(snapshot.now, snapshot.stale_after_s)
            else i.describe(snapshot.now, snapshot.stale_after_s) for i in instances)
        return f"no healthy {role.value} instance in pool {pool!r} ({len(instances)} registered: {states})"
