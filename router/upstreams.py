"""The registry with its connections: one channel and one watcher per instance.

Registering an instance opens its channel and starts its watcher;
deregistering cancels the watcher and closes the channel once the requests
running on it have finished (or the grace period is over).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence

import grpc

from router import policy
from router.config import PolicyName, RouterConfig
from router.kv_index import KvIndex
from router.policy_prefix import PrefixTable, prefix_blocks
from router.tokenizer import load_tokenizer
from router.registry import Identity, Instance, InstanceSpec, Registry, Role
from router.watcher import InstanceWatcher
from services.common.tls import Channels
from services.common.stubs import generation_pb2 as gen

log = logging.getLogger(__name__)

GENERATE_METHOD = "/llmesh.v1.TargetModel/Generate"


def open_channel(address: str, reconnect_max_s: float, channels: Channels | None = None) -> grpc.aio.Channel:
    """A channel of ``channels`` (default: plaintext), with reconnection
    backoff bounded so that a restarted instance is reachable again within
    ``reconnect_max_s``. No client interceptors: they cost two generator
    layers per streamed chunk; the forwarder propagates trace context itself."""
    backoff_ms = max(100, int(reconnect_max_s * 1000))
    return (channels or Channels()).open(address, None, options=[("grpc.initial_reconnect_backoff_ms", 100),
                                                    ("grpc.min_reconnect_backoff_ms", 100),
                                                    ("grpc.max_reconnect_backoff_ms", backoff_ms)])


class Upstreams:
    """The router's upstream instances: the registry, one channel and one watcher per
    instance, and the routing decision over them. Event-loop thread only."""

    def __init__(self, config: RouterConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.registry = Registry(config.eject_after_failures, config.eject_for_s)
        self.channels = config.channels()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._generate: dict[str, grpc.aio.UnaryStreamMultiCallable] = {}
        self._watchers: dict[str, InstanceWatcher] = {}
        self._closing: set[asyncio.Task] = set()
        self._sequence = itertools.count()
        self._rng = random.Random()
        self.weights = policy.Weights(config.weight_idle, config.weight_queue, config.weight_latency,
                                      config.weight_availability)
        #: Pools of each priority class: its own, then those it may spill over to.
        spill = config.spillover_map()
        self.priority_pools = {cls: (pool, *spill.get(cls, ())) for cls, pool in config.priority_pools().items()}
        self._prefixes = {role: PrefixTable(config.affinity_table_size) for role in (Role.TARGET, Role.DRAFT)}
        #: kv_aware: which target holds which KV blocks (from their KV events), and the
        #: targets' tokenizer for text prompts (None: token-id prompts only).
        self.kv_index = KvIndex() if config.policy is PolicyName.KV_AWARE else None
        #: (instance id, request sequence) -> block hashes kv_aware expects the request to store there.
        self._expecting: dict[tuple[str, int], tuple[int, ...]] = {}
        #: kv_aware: instance id -> prompt tokens routed there and not yet prefilled, and
        #: (instance id, request sequence) -> that request's share.
        self._queued_prefill: dict[str, int] = {}
        self._queued_of: dict[tuple[str, int], int] = {}
        self._tokenizer = load_tokenizer(config.tokenizer) if self.kv_index is not None and config.tokenizer else None

    # -- membership ------------------------------------------------------------
    def register(self, spec: InstanceSpec) -> Instance:
        inst, replaced = self.registry.upsert(spec)
        if replaced is not None:
            self._disconnect(replaced.id)
            self._prefixes[replaced.spec.role].forget(replaced.id)
            if self.kv_index is not None:
                self.kv_index.forget(replaced.id)
        if inst.id not in self._channels:
            channel = open_channel(spec.address, self.config.reconnect_max_s, self.channels)
            self._generate[inst.id] = channel.unary_stream(
                GENERATE_METHOD, request_serializer=gen.GenerateRequest.SerializeToString,
                response_deserializer=gen.GenerateChunk.FromString)
            c = self.config
            kv = self.kv_index if spec.role is Role.TARGET else None
            watcher = InstanceWatcher(inst.id, channel, self.registry, c.load_interval_s, c.health_interval_s,
                                      c.reconnect_min_s, c.reconnect_max_s, self.clock, kv, c.kv_events_interval_s)
            self._channels[inst.id], self._watchers[inst.id] = channel, watcher
            watcher.start()
            log.info("registered %s %s at %s (pool %s)", spec.role.value, inst.id, spec.address, spec.pool)
        elif inst.identity is Identity.UNCHECKED:
            self._watchers[inst.id].verify()  # registered again as another role: asked as that
        return inst

    def deregister(self, instance_id: str) -> Instance:
        inst = self.registry.remove(instance_id)
        self._disconnect(instance_id)
        self._prefixes[inst.spec.role].forget(instance_id)
        if self.kv_index is not None:
            self.kv_index.forget(instance_id)
        log.info("deregistered %s", instance_id)
        return inst

    def drain(self, instance_id: str) -> Instance:
        inst = self.registry.drain(instance_id)
        log.info("draining %s", instance_id)
        return inst

    def _disconnect(self, instance_id: str) -> None:
        channel = self._channels.pop(instance_id, None)
        watcher = self._watchers.pop(instance_id, None)
        self._generate.pop(instance_id, None)
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

    def generate_method(self, instance_id: str) -> grpc.aio.UnaryStreamMultiCallable:
        """TargetModel.Generate on the instance's channel (made once per instance)."""
        return self._generate[instance_id]

    def suspect(self, instance_id: str) -> None:
        """A call to the instance failed: have its health looked at again now."""
        watcher = self._watchers.get(instance_id)
        if watcher is not None:
            watcher.recheck()

    def verify(self, instance_id: str) -> None:
        """The instance answered as another kind of server than registered:
        not routable until it answers GetInfo as its role again (asked now)."""
        self.registry.forget_identity(instance_id)
        watcher = self._watchers.get(instance_id)
        if watcher is not None:
            watcher.verify()

    def next_sequence(self) -> int:
        return next(self._sequence)

    def pools_for(self, priority_class: str) -> tuple[str, ...]:
        """The pools a request of the class may go to, in order."""
        return self.priority_pools[priority_class]

    def pools(self) -> list[str]:
        """Every pool with an instance or named in the configuration, sorted."""
        named = {p for pools in self.priority_pools.values() for p in pools} | set(self.config.pool_bounds())
        return sorted(named | {i.spec.pool for i in self.registry})

    def snapshot(self, sequence: int = 0, exclude: frozenset[str] = frozenset(),
                 affinity: dict[str, int] | None = None, prefill: dict[str, int] | None = None,
                 queued: dict[str, int] | None = None) -> policy.Snapshot:
        now = self.clock()
        self.registry.readmit(now)
        return policy.Snapshot(now=now, stale_after_s=self.config.stale_after_s, sequence=sequence, exclude=exclude,
                               seed=self._rng.getrandbits(64), weights=self.weights, affinity=affinity or {},
                               max_imbalance=self.config.affinity_max_imbalance, prefill_tokens=prefill or {},
                               queued_prefill=queued or {}, kv_queue_weight=self.config.kv_queue_weight,
                               kv_load_weight=self.config.kv_load_weight)

    def prefix_blocks(self, prompt: str | Sequence[int]) -> tuple[int, ...]:
        """What the policy routes a prompt by: prefix_affinity's prefix blocks;
        kv_aware's prompt token ids (text tokenized as the targets do, () without
        a tokenizer); () for the other policies."""
        if self.config.policy is PolicyName.KV_AWARE:
            if isinstance(prompt, str):
                return tuple(self._tokenizer.encode(prompt, add_special_tokens=False).ids) if self._tokenizer else ()
            return tuple(prompt)
        if self.config.policy is not PolicyName.PREFIX_AFFINITY:
            return ()
        return prefix_blocks(prompt, self.config.affinity_block)

    def choose(self, role: Role, pools: Sequence[str], sequence: int, exclude: frozenset[str] = frozenset(),
               prefix: tuple[int, ...] = ()) -> Instance | None:
        """The policy's pick in the first of ``pools`` that has an eligible instance
        (``prefix``: what :meth:`prefix_blocks` gave for the request's prompt)."""
        if self.kv_index is not None:
            return self._choose_kv_aware(role, pools, sequence, exclude, prefix)
        table = self._prefixes[role]
        snapshot = self.snapshot(sequence, exclude, table.match(prefix) if prefix else None)
        for pool in pools:
            inst = policy.choose(self.config.policy, self.registry.select(role, pool), snapshot)
            if inst is not None:
                if prefix:
                    table.record(prefix, inst.id)
                return inst
        return None

    def _choose_kv_aware(self, role: Role, pools: Sequence[str], sequence: int, exclude: frozenset[str],
                         prompt_ids: tuple[int, ...]) -> Instance | None:
        now = self.clock()
        for pool in pools:
            instances = self.registry.select(role, pool)
            cached = self.kv_index.cached_tokens([i.id for i in instances], prompt_ids, now) if prompt_ids else {}
            prefill = {iid: len(prompt_ids) - hit for iid, hit in cached.items()}
            snapshot = self.snapshot(sequence, exclude, prefill=prefill, queued=self._queued_prefill)
            inst = policy.choose(self.config.policy, instances, snapshot)
            if inst is not None:
                if prompt_ids:
                    hashes = self.kv_index.expect(inst.id, prompt_ids, now)
                    if hashes:
                        self._expecting[(inst.id, sequence)] = hashes
                    if self.config.kv_queue_weight:  # off by default: no bookkeeping nothing reads
                        tokens = prefill.get(inst.id, 0)
                        self._queued_of[(inst.id, sequence)] = tokens
                        self._queued_prefill[inst.id] = self._queued_prefill.get(inst.id, 0) + tokens
                return inst
        return None

    def prefilled(self, instance_id: str, sequence: int) -> None:
        """Request ``sequence`` got its first token from the instance: its prompt
        no longer counts in the prefill queued there (kv_aware)."""
        tokens = self._queued_of.pop((instance_id, sequence), None)
        if tokens is not None:
            left = self._queued_prefill.get(instance_id, 0) - tokens
            if left > 0:
                self._queued_prefill[instance_id] = left
            else:
                self._queued_prefill.pop(instance_id, None)

    def finished(self, instance_id: str, sequence: int) -> None:
        """Request ``sequence`` on the instance has ended (finished or failed):
        the blocks kv_aware expected it to store stay expected only until its
        KV events arrive or a short grace passes (:meth:`KvIndex.settle`)."""
        self.prefilled(instance_id, sequence)
        hashes = self._expecting.pop((instance_id, sequence), None)
        if hashes and self.kv_index is not None:
            self.kv_index.settle(instance_id, hashes, self.clock())

    def routable_besides(self, role: Role, pools: Sequence[str], tried: Sequence[str]) -> bool:
        """Has one of ``pools`` an instance of the role, not in ``tried``, that may take a request now?"""
        now = self.clock()
        return any(i.routable(now, self.config.stale_after_s) and i.id not in tried
                   for pool in pools for i in self.registry.select(role, pool))

    def routable(self, role: Role, pool: str) -> bool:
        """Has the pool an instance of the role that may take a request now?"""
        now = self.clock()
        return any(i.routable(now, self.config.stale_after_s) for i in self.registry.select(role, pool))

    def why_none(self, role: Role, pools: Sequence[str], exclude: frozenset[str] = frozenset()) -> str:
        """Why no instance of the role in the pools can take a request, instance by instance."""
        return "; ".join(self._why_none(role, pool, exclude) for pool in pools)

    def _why_none(self, role: Role, pool: str, exclude: frozenset[str]) -> str:
        snapshot = self.snapshot()
        instances = self.registry.select(role, pool)
        if not instances:
            return f"no {role.value} instance registered in pool {pool!r}"
        states = ", ".join(
            f"{i.id} already tried" if i.id in exclude and i.routable(snapshot.now, snapshot.stale_after_s)
            else i.describe(snapshot.now, snapshot.stale_after_s) for i in instances)
        return f"no healthy {role.value} instance in pool {pool!r} ({len(instances)} registered: {states})"
