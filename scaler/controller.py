"""The control loop: read the load, decide, and bring each pool to its desired count.

Every ``interval_s`` (or at once after SetPolicy / ScaleTo) the loop lists
the router's registry, asks the monitor for each pool's load, applies
:func:`scaler.policy.decide` and reconciles:

- scale up: the backend starts an instance; the loop waits until it
  reports SERVING on ``grpc.health.v1``, runs a warm-up generation on it,
  then registers it with the router (so no client request ever meets a
  cold instance);
- scale down: of the instances this scaler started, the one with the least
  in-flight work is drained (the router sends it nothing new), the loop
  waits until the router and the instance report nothing in flight (or the
  policy's drain timeout passes), deregisters it, and stops it with
  SIGTERM. Instances the scaler did not start are never stopped.

Each start and each drain runs as its own task, so a slow start does not
hold up the loop; the state counts instances on their way, so the loop does
not start them twice. Every step is recorded in the history.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scaler.backends import Backend, LaunchSpec, Launched
from scaler.router_client import RouterClient
from scaler.load import MonitorLoad
from scaler.policy import Memory, PoolMetrics, decide
from scaler.state import Event, Managed, ManagedState, ScalerState
from services.common.waits import wait_event
from services.common.load import Role
from services.common.tls import Channels
from services.common.stubs import generation_pb2, model_pb2_grpc

log = logging.getLogger(__name__)

POLL_S = 0.2
WARMUP_PROMPT = "Hello"


class Controller:
    def __init__(self, state: ScalerState, router: RouterClient, load: MonitorLoad, backend: Backend, *,
                 interval_s: float, start_timeout_s: float, warmup_tokens: int, stop_grace_s: float,
                 retry_after_s: float, clock: Callable[[], float] = time.time,
                 channels: Channels | None = None) -> None:
        self.state = state
        self.channels = channels or Channels()
        self.router = router
        self.load = load
        self.backend = backend
        self.interval_s = interval_s
        self.start_timeout_s = start_timeout_s
        self.warmup_tokens = warmup_tokens
        self.stop_grace_s = stop_grace_s
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ops: set[asyncio.Task] = set()
        self._sequence = itertools.count(1)

    # -- the loop ---------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scaler-control")

    def wake(self) -> None:
        """Runs the next tick now (a policy or a manual count changed)."""
        self._wake.set()

    async def _loop(self) -> None:
        await self._adopt()
        while True:
            self._wake.clear()
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - one bad tick must not end the control loop
                log.exception("scaling tick failed")
            await wait_event(self._wake, self.interval_s)

    async def tick(self) -> None:
        """One look at every pool: decide, then start or drain what the decision asks for."""
        router_ok = await self.router.refresh()
        self._reap()
        if router_ok:
            self._relist()
        for pool in self.state.governed_pools():
            policy = self.state.policy(pool)
            current = self.state.counted(pool)
            if policy.manual_instances:
                metrics = PoolMetrics(current)
            else:
                targets = {i.id for i in self.state.listing if i.pool == pool and i.role == Role.TARGET}
                metrics = await self.load.pool(pool, current, targets)
            starting = sum(m.pool == pool and m.state in (ManagedState.STARTING, ManagedState.WARMING)
                           for m in self.state.managed.values())
            metrics = dataclasses.replace(metrics, starting=starting, limit=self.state.limit(pool))
            now = self.clock()
            decision = decide(metrics, policy, self.state.memory.get(pool, Memory()), now)
            self.state.decided(pool, decision, now)
            if router_ok:
                self._reconcile(pool, decision.desired, now)

    def _reconcile(self, pool: str, desired: int, now: float) -> None:
        counted = self.state.counted(pool)
        if desired > counted:
            failure = self.state.start_failures.get(pool)
            if failure is not None and failure[1] > now:
                return
            for _ in range(desired - counted):
                self._spawn(self._scale_up(pool))
        elif desired < counted:
            starting = sum(m.pool == pool and m.state in (ManagedState.STARTING, ManagedState.WARMING)
                           for m in self.state.managed.values())
            for m in self.state.victims(pool, counted - desired - starting):
                m.state = ManagedState.DRAINING  # counted out at once: the next tick does not pick it again
                self._spawn(self._scale_down(m))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._ops.add(task)
        task.add_done_callback(self._ops.discard)

    async def settle(self) -> None:
        """Waits until every start and drain under way has finished (tests, shutdown)."""
        while self._ops:
            await asyncio.gather(*list(self._ops), return_exceptions=True)

    # -- events -----------------------------------------------------------------
    def _serving(self, pool: str) -> int:
        """The pool's targets that take traffic now."""
        managed = {m.id: m for m in self.state.managed.values() if m.pool == pool}
        ids = {i.id for i in self.state.listing if i.pool == pool and i.role == Role.TARGET and i.active
               and (i.id not in managed or managed[i.id].state == ManagedState.SERVING)}
        ids |= {i for i, m in managed.items() if m.state == ManagedState.SERVING}
        return len(ids)

    def _event(self, m: Managed, kind: str, reason: str, before: int, after: int, **figures: float) -> None:
        log.log(logging.WARNING if kind == "failed" else logging.INFO, "pool %s: %s", m.pool, reason)
        self.state.record(Event(self.clock(), m.pool, before, after, reason, kind,
                                {k: float(v) for k, v in figures.items()}, m.id))

    async def _adopt(self) -> None:
        """Manages as its own the instances a previous scaler left running (backend.adopt)."""
        try:
            left = await self.backend.adopt()
        except Exception as exc:  # noqa: BLE001 - adoption is best effort; the loop must start
            log.warning("could not look for instances a previous scaler left: %s", _describe(exc))
            return
        for spec, launched, started_at in left:
            m = Managed(spec.instance_id, spec.pool, Role.TARGET, ManagedState.SERVING, started_at,
                        launched.address, launched.ref, launched)
            self.state.managed[m.id] = m
            n = self._serving(m.pool)
            self._event(m, "serving", f"adopted {m.id} at {m.address} ({launched.ref}): a previous scaler "
                                      "started it and it still runs", n, n)

    def _new_id(self, pool: str) -> str:
        taken = set(self.state.managed) | {i.id for i in self.state.listing}
        while (instance_id := f"{pool}-auto-{next(self._sequence)}") in taken:
            pass
        return instance_id

    # -- scale up ---------------------------------------------------------------
    async def _scale_up(self, pool: str) -> None:
        m = Managed(self._new_id(pool), pool, Role.TARGET, ManagedState.STARTING, self.clock())
        self.state.managed[m.id] = m
        launched: Launched | None = None
        began = time.monotonic()
        try:
            launched = await self.backend.start(LaunchSpec(m.id, pool))
            m.address, m.backend_ref, m.handle = launched.address, launched.ref, launched
            n = self._serving(pool)
            self._event(m, "started", f"started {m.id} at {m.address} ({launched.ref})", n, n)
            channel = self.channels.open(launched.address)
            try:
                await self._wait_serving(channel, launched)
                ready_s = time.monotonic() - began
                m.state = ManagedState.WARMING
                warm_began = time.monotonic()
                await self._warm_up(channel)
                warmup_s = time.monotonic() - warm_began
            finally:
                await channel.close()
            n = self._serving(pool)
            await self.router.register(m.id, m.address, pool)
            m.state = ManagedState.SERVING
            self.state.start_failures.pop(pool, None)
            self._event(m, "serving", f"{m.id} serving: SERVING after {ready_s:.1f} s, warmed up with "
                                      f"{self.warmup_tokens} token(s) in {warmup_s:.2f} s, registered with the router",
                        n, n + 1, startup_s=ready_s, warmup_s=warmup_s, total_s=time.monotonic() - began)
        except asyncio.CancelledError:
            raise  # shutting down: close() deregisters and stops what is left
        except Exception as exc:  # noqa: BLE001 - any failure ends this start, reported and retried later
            why = _describe(exc)
            self.state.managed.pop(m.id, None)
            self.state.start_failures[pool] = (why.splitlines()[0][:200], self.clock() + self.retry_after_s)
            n = self._serving(pool)
            self._event(m, "failed", f"could not start {m.id}: {why}", n, n)
            if launched is not None:
                await self._forget(m, launched)

    async def _wait_serving(self, channel: grpc.aio.Channel, launched: Launched) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            problem = self.backend.problem(launched)
            if problem is not None:
                raise RuntimeError(f"it exited before it was SERVING: {problem}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"not SERVING after {self.start_timeout_s:g} s")
            await asyncio.sleep(POLL_S)

    async def _warm_up(self, channel: grpc.aio.Channel) -> None:
        """One short greedy generation, straight to the instance (not through the router)."""
        if self.warmup_tokens <= 0:
            return
        request = generation_pb2.GenerateRequest(
            request_id="scaler-warmup", prompt=generation_pb2.Prompt(text=WARMUP_PROMPT),
            sampling=generation_pb2.SamplingParams(max_new_tokens=self.warmup_tokens, ignore_eos=True))
        request.speculation.enabled = False
        async for _ in model_pb2_grpc.TargetModelStub(channel).Generate(request, timeout=self.start_timeout_s):
            pass

    # -- scale down -------------------------------------------------------------
    async def _scale_down(self, m: Managed) -> None:
        policy = self.state.policy(m.pool)
        before = self._serving(m.pool) + 1
        began = time.monotonic()
        try:
            if not await self.router.drain(m.id):
                log.info("%s was not registered with the router; stopping it", m.id)
            self._event(m, "draining", f"draining {m.id}: the router sends it no new request", before, before - 1)
            left = await self._wait_drained(m, policy.drain_timeout_s)
            drain_s = time.monotonic() - began
            await self.router.deregister(m.id)
            await self.backend.stop(m.handle, self.stop_grace_s)
            self.state.managed.pop(m.id, None)
            how = (f"drained in {drain_s:.1f} s" if left == 0
                   else f"drain timeout of {policy.drain_timeout_s:g} s passed with {left} request(s) in flight")
            self._event(m, "stopped", f"stopped {m.id}: {how}, deregistered, SIGTERM", before - 1, before - 1,
                        drain_s=drain_s, in_flight_at_stop=left)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the instance stays managed; the next tick looks again
            m.state = ManagedState.SERVING
            self._event(m, "failed", f"could not drain {m.id}: {_describe(exc)}", before, before)

    async def _wait_drained(self, m: Managed, timeout_s: float) -> int:
        """Requests still in flight when the wait ended (0: drained)."""
        deadline = time.monotonic() + timeout_s
        while True:
            inst = await self.router.instance(m.id, m.pool)
            left = 0 if inst is None else inst.in_flight + inst.load_in_flight
            if left == 0 or time.monotonic() > deadline:
                return left
            await asyncio.sleep(POLL_S)

    # -- instances that died ----------------------------------------------------
    def _reap(self) -> None:
        for m in list(self.state.managed.values()):
            if m.state != ManagedState.SERVING or m.handle is None:
                continue
            problem = self.backend.problem(m.handle)
            if problem is not None:
                self.state.managed.pop(m.id, None)
                n = self._serving(m.pool)
                self._event(m, "failed", f"{m.id} exited on its own: {problem}", n + 1, n)
                self._spawn(self._forget(m, m.handle))

    def _relist(self) -> None:
        """Registers again the serving instances the router no longer lists (it restarted, or
        someone deregistered them): they run and were warmed up, so they should take traffic."""
        listed = {i.id for i in self.state.listing}
        for m in list(self.state.managed.values()):
            if m.state == ManagedState.SERVING and m.id not in listed:
                self._spawn(self._register_again(m))

    async def _register_again(self, m: Managed) -> None:
        try:
            await self.router.register(m.id, m.address, m.pool)
        except grpc.aio.AioRpcError as exc:
            log.warning("could not register %s again: %s", m.id, exc.details())
            return
        n = self._serving(m.pool)
        self._event(m, "serving", f"{m.id} registered again: the router no longer listed it", n, n)

    async def _forget(self, m: Managed, launched: Launched) -> None:
        """Deregisters (if registered) and stops an instance that failed."""
        try:
            await self.router.deregister(m.id)
        except grpc.aio.AioRpcError as exc:
            log.warning("could not deregister %s: %s", m.id, exc.details())
        await self.backend.stop(launched, self.stop_grace_s)

    # -- shutdown ---------------------------------------------------------------
    async def close(self) -> None:
        """Stops the loop and every instance this scaler started (deregistered first)."""
        if self._task is not None:
            while not self._task.done():  # again until it ends: a cancellation can be lost (services.common.waits)
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1.0)
            self._task = None
        for task in list(self._ops):
            task.cancel()
        await asyncio.gather(*list(self._ops), return_exceptions=True)
        for m in list(self.state.managed.values()):
            try:
                await self.router.deregister(m.id)
            except grpc.aio.AioRpcError:
                pass  # the router is gone too
        self.state.managed.clear()
        await self.backend.close(self.stop_grace_s)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__
