"""The scaler with its local backend against a real router, a real tiny target and a real monitor:
ScaleTo 2 starts a second target process that turns SERVING, is warmed up and registered;
ScaleTo 1 drains and stops it while streams run, and no request fails."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from monitor.config import MonitorConfig
from monitor.main import create_server as create_monitor
from router.config import RouterConfig
from router.main import create_server as create_router
from scaler.backends.local import LocalBackend
from scaler.config import ScalerConfig
from scaler.main import create_server as create_scaler
from services.cli import status as cli_status
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import monitor_pb2, monitor_pb2_grpc, router_pb2, router_pb2_grpc, scaler_pb2, \
    scaler_pb2_grpc
from services.target.config import TargetConfig
from services.target.main import create_server as create_target
from tests.test_monitor_fakes import eventually

START_TIMEOUT_S = 120.0


async def listed(router) -> list[router_pb2.InstanceStatus]:
    return list((await router.ListInstances(router_pb2.ListInstancesRequest())).instances)


async def serving(router, n: int) -> list[router_pb2.InstanceStatus] | None:
    instances = await listed(router)
    ok = [i for i in instances if i.health == router_pb2.INSTANCE_HEALTH_SERVING
          and i.state == router_pb2.INSTANCE_STATE_ACTIVE]
    return instances if len(instances) == n and len(ok) == n else None


def sampled(i: int) -> gen.GenerateRequest:
    """Sampled without a seed: never answered from the router's response cache."""
    return gen.GenerateRequest(prompt=gen.Prompt(text=f"stream {i} says"),
                               sampling=gen.SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True))


@pytest.mark.timeout(300)
async def test_scale_to_two_then_one_warms_up_registers_and_drains_without_failures(tiny_models, tmp_path):
    target = create_target(TargetConfig.from_namespace(
        {"model": str(tiny_models.target), "port": 0, "max_batch_size": 8, "warmup": False, "threads": 1}, env={}))
    await target.start()
    router = create_router(RouterConfig.from_namespace(
        {"port": 0, "http_port": 0, "targets": [target.address], "load_interval_s": 0.1, "policy": "round_robin"}, env={}))
    await router.start()
    monitor = create_monitor(MonitorConfig.from_namespace(
        {"port": 0, "router": router.address, "watch_interval_s": 0.1, "list_interval_s": 0.2,
         "prometheus_port": 0}, env={}))
    await monitor.start()
    backend = LocalBackend(tiny_models.target, tmp_path / "logs",
                           extra_args="--threads 1 --max-batch-size 8 --warmup false --log-level warning",
                           max_targets=2)  # two targets, whatever the cores of the machine the test runs on
    scaler = create_scaler(ScalerConfig.from_namespace(
        {"port": 0, "router": router.address, "monitor": monitor.address, "interval_s": 0.2,
         "start_timeout_s": START_TIMEOUT_S, "warmup_tokens": 2, "stop_grace_s": 10.0}, env={}), backend=backend)
    await scaler.start()
    channels = [grpc.aio.insecure_channel(a) for a in (router.address, scaler.address, monitor.address)]
    router_stub = router_pb2_grpc.RouterStub(channels[0])
    scaler_stub = scaler_pb2_grpc.ScalerStub(channels[1])
    monitor_stub = monitor_pb2_grpc.MonitorStub(channels[2])
    try:
        await eventually(lambda: serving(router_stub, 1))
        reply = await scaler_stub.ScaleTo(scaler_pb2.ScaleToRequest(pool="default", instances=2))
        assert (reply.pool.current, reply.pool.desired) == (1, 2)

        instances = await eventually(lambda: serving(router_stub, 2), timeout_s=START_TIMEOUT_S)
        (added,) = [i for i in instances if i.spec.id != target.address]
        assert added.spec.pool == "default" and added.spec.labels["managed-by"] == scaler.instance_id
        history = (await scaler_stub.GetHistory(scaler_pb2.GetHistoryRequest(pool="default"))).events
        steps = [(e.kind, e.instance_id) for e in history if e.instance_id]
        assert steps == [("started", added.spec.id), ("serving", added.spec.id)]
        assert "warmed up with 2 token(s)" in history[-1].reason and history[-1].to_instances == 2
        # The warm-up went straight to the instance, before the router knew it (its count since start:
        # a rate over the load window can have forgotten it by now on a slow machine).
        assert added.load.tokens_generated_total >= 2
        status = next(p for p in (await scaler_stub.GetStatus(scaler_pb2.GetStatusRequest())).pools
                      if p.pool == "default")
        assert (status.current, status.desired) == (2, 2)
        assert {i.id: i.state for i in status.instances} == {
            target.address: scaler_pb2.MANAGED_STATE_EXTERNAL, added.spec.id: scaler_pb2.MANAGED_STATE_SERVING}
        # `llmesh status` (a blocking client: off the loop that serves everything here).
        shown = await asyncio.to_thread(cli_status.collect, router.address, monitor.address, scaler.address)
        (pool,) = [p for p in shown["pools"] if p["pool"] == "default"]
        assert (pool["current"], pool["desired"]) == (2, 2) and pool["managed"][0]["id"] == added.spec.id
        assert "recommendation" in shown and "top recommendation" in cli_status.render(shown)

        # Streams through the router while the added instance is drained.
        results: list[tuple[bool, str, str]] = []
        stop = asyncio.Event()

        async def client(n: int) -> None:
            i = 0
            while not stop.is_set():
                instance, ok, why = "", False, ""
                try:
                    async for chunk in router_stub.Generate(sampled(n * 1000 + i), timeout=60):
                        instance = chunk.instance_id or instance
                        ok = chunk.finish_reason == gen.FINISH_REASON_LENGTH
                except grpc.aio.AioRpcError as exc:
                    why = f"{exc.code().name}: {exc.details()}"
                results.append((ok, instance, why))
                i += 1

        clients = [asyncio.create_task(client(n)) for n in range(4)]

        async def busy() -> bool:
            return any(i.spec.id == added.spec.id and i.in_flight > 0 for i in await listed(router_stub))

        await eventually(busy, timeout_s=30)
        await scaler_stub.ScaleTo(scaler_pb2.ScaleToRequest(pool="default", instances=1))
        remaining = await eventually(lambda: serving(router_stub, 1), timeout_s=60)
        assert remaining[0].spec.id == target.address
        await eventually(lambda: not backend._running, timeout_s=30)  # the process is gone
        await asyncio.sleep(0.5)  # sleep-ok: a few more requests on the remaining instance
        stop.set()
        await asyncio.gather(*clients)

        failures = [r for r in results if not r[0]]
        assert not failures, failures[:5]
        assert any(instance == added.spec.id for _, instance, _ in results)
        history = (await scaler_stub.GetHistory(scaler_pb2.GetHistoryRequest(pool="default"))).events
        steps = [e.kind for e in history if e.instance_id == added.spec.id]
        assert steps == ["started", "serving", "draining", "stopped"]
        stopped = history[-1]
        assert stopped.figures["in_flight_at_stop"] == 0 and "drained in" in stopped.reason

        # The monitor followed the fleet: the pool's figures cover what ran, over every standard window.
        reply = await monitor_stub.GetThroughput(monitor_pb2.GetThroughputRequest(
            window_s=10, scope=monitor_pb2.Scope(pool="default")))
        assert reply.metrics.tokens_per_second > 0 and [w.window_s for w in reply.windows] == [10, 60, 300]
    finally:
        for channel in channels:
            await channel.close()
        await scaler.stop(0)
        await monitor.stop(0)
        await router.stop(0)
        await target.stop(0)
