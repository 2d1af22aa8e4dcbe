"""The scaler over a real gRPC channel, on port 0, against a fake router; and its pure policy."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scaler.config import ScalerConfig
from scaler.main import create_server
from scaler.policy import Policy, bounded, checked, desired
from services.common.errors import InvalidArgument
from services.common.stubs import router_pb2, scaler_pb2, scaler_pb2_grpc, stats_pb2, stats_pb2_grpc
from tests.conftest import free_port
from tests.test_monitor_fakes import FakeRouter


@pytest.fixture
async def fake_router():
    router = await FakeRouter().start()
    yield router
    await router.stop()


@pytest.fixture
async def scaler():
    running = []

    async def make(router: str, **overrides):
        config = ScalerConfig.from_namespace({"port": 0, "router": router, "rpc_timeout_s": 1.0, **overrides}, env={})
        app = create_server(config)
        await app.start()
        channel = grpc.aio.insecure_channel(app.address)
        running.append((app, channel))
        return scaler_pb2_grpc.ScalerStub(channel), channel

    yield make
    for app, channel in running:
        await channel.close()
        await app.stop(0)


def by_pool(reply) -> dict[tuple[str, int], scaler_pb2.PoolStatus]:
    return {(p.pool, p.role): p for p in reply.pools}


async def test_get_status_reflects_the_routers_instances(fake_router, scaler):
    fake_router.add("t1", "10.0.0.1:50061", pool="default")
    fake_router.add("t2", "10.0.0.2:50061", pool="default")
    fake_router.add("t3", "10.0.0.3:50061", pool="default", state=router_pb2.INSTANCE_STATE_DRAINING)
    fake_router.add("d1", "10.0.0.4:50071", role=stats_pb2.ROLE_DRAFT, pool="default")
    fake_router.add("b1", "10.0.0.5:50061", pool="batch")
    stub, _ = await scaler(fake_router.address)

    reply = await stub.GetStatus(scaler_pb2.GetStatusRequest())
    assert reply.backend == "local"
    pools = by_pool(reply)
    assert set(pools) == {("default", stats_pb2.ROLE_TARGET), ("default", stats_pb2.ROLE_DRAFT),
                          ("batch", stats_pb2.ROLE_TARGET)}
    targets = pools[("default", stats_pb2.ROLE_TARGET)]
    assert [i.id for i in targets.instances] == ["t1", "t2", "t3"]
    assert {i.state for i in targets.instances} == {scaler_pb2.MANAGED_STATE_EXTERNAL}
    assert targets.current == 2 and targets.desired == 2  # the draining one is not counted
    assert "no automatic policy yet" in targets.reason
    assert targets.policy.max_instances == 8 and targets.policy.target_utilization == pytest.approx(0.7)
    assert pools[("default", stats_pb2.ROLE_DRAFT)].instances[0].address == "10.0.0.4:50071"

    fake_router.remove("b1")
    reply = await stub.GetStatus(scaler_pb2.GetStatusRequest())
    assert ("batch", stats_pb2.ROLE_TARGET) not in by_pool(reply)


async def test_get_status_without_a_router_says_so(scaler):
    stub, channel = await scaler(f"127.0.0.1:{free_port()}")
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reply = await stub.GetStatus(scaler_pb2.GetStatusRequest())
    assert list(reply.pools) == []
    await stub.SetPolicy(scaler_pb2.SetPolicyRequest(pool="p", policy=scaler_pb2.ScalingPolicy(max_instances=2)))
    (pool,) = (await stub.GetStatus(scaler_pb2.GetStatusRequest())).pools
    assert "router unreachable" in pool.reason and pool.current == 0


@pytest.mark.parametrize("policy, field", [
    (dict(min_instances=3, max_instances=2), "policy.max_instances"),
    (dict(min_instances=-1, max_instances=2), "policy.min_instances"),
    (dict(max_instances=0), "policy.max_instances"),
    (dict(max_instances=4, target_utilization=1.5), "policy.target_utilization"),
    (dict(max_instances=4, target_utilization=-0.1), "policy.target_utilization"),
    (dict(max_instances=4, target_utilization=float("nan")), "policy.target_utilization"),
    (dict(max_instances=4, tolerance=1.0), "policy.tolerance"),
    (dict(max_instances=4, scale_down_window_s=-5), "policy.scale_down_window_s"),
    (dict(min_instances=1, max_instances=4, manual_instances=9), "policy.manual_instances"),
])
async def test_set_policy_validation_names_the_field(fake_router, scaler, policy, field):
    stub, _ = await scaler(fake_router.address)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SetPolicy(scaler_pb2.SetPolicyRequest(pool="default", policy=scaler_pb2.ScalingPolicy(**policy)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")


async def test_set_policy_without_pool_or_policy_is_refused(fake_router, scaler):
    stub, _ = await scaler(fake_router.address)
    for request, field in ((scaler_pb2.SetPolicyRequest(policy=scaler_pb2.ScalingPolicy(max_instances=1)), "pool"),
                           (scaler_pb2.SetPolicyRequest(pool="default"), "policy")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SetPolicy(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)


async def test_policy_scale_to_history_and_events(fake_router, scaler):
    fake_router.add("t1", "10.0.0.1:50061")
    stub, _ = await scaler(fake_router.address)
    events = stub.WatchEvents(scaler_pb2.WatchEventsRequest(pool="default"))
    other = stub.WatchEvents(scaler_pb2.WatchEventsRequest(pool="elsewhere"))

    reply = await stub.SetPolicy(scaler_pb2.SetPolicyRequest(
        pool="default", policy=scaler_pb2.ScalingPolicy(min_instances=1, max_instances=4)))
    assert reply.pool.policy.target_utilization == pytest.approx(0.7)  # 0: the documented default
    assert reply.pool.policy.tolerance == pytest.approx(0.1)
    assert (reply.pool.current, reply.pool.desired) == (1, 1)
    first = await asyncio.wait_for(events.read(), 5)
    assert first.kind == "decision" and first.pool == "default" and first.figures["max_instances"] == 4

    reply = await stub.ScaleTo(scaler_pb2.ScaleToRequest(pool="default", instances=3))
    assert (reply.pool.current, reply.pool.desired) == (1, 3)
    assert "manual: ScaleTo 3" in reply.pool.reason and "does not start" in reply.pool.reason
    assert reply.pool.policy.manual_instances == 3
    second = await asyncio.wait_for(events.read(), 5)
    assert (second.from_instances, second.to_instances) == (1, 3)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ScaleTo(scaler_pb2.ScaleToRequest(pool="default", instances=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("instances:")

    history = await stub.GetHistory(scaler_pb2.GetHistoryRequest(pool="default"))
    assert [(e.from_instances, e.to_instances) for e in history.events] == [(1, 1), (1, 3)]
    later = await stub.GetHistory(scaler_pb2.GetHistoryRequest(since=history.events[0].timestamp))
    assert len(later.events) == 1
    assert list((await stub.GetHistory(scaler_pb2.GetHistoryRequest(pool="elsewhere"))).events) == []

    back = await stub.ScaleTo(scaler_pb2.ScaleToRequest(pool="default", instances=0))
    assert back.pool.desired == 1 and back.pool.policy.manual_instances == 0
    events.cancel()
    other.cancel()


async def test_serves_its_own_stats(fake_router, scaler):
    _, channel = await scaler(fake_router.address)
    call = stats_pb2_grpc.StatsStub(channel).Watch(stats_pb2.WatchStatsRequest(interval_s=0.05))
    report = await call.read()
    call.cancel()
    assert report.role == stats_pb2.ROLE_SCALER


# -- the pure policy -------------------------------------------------------------

def test_checked_applies_documented_defaults():
    p = checked(Policy(min_instances=0, max_instances=3, target_utilization=0, tolerance=0, scale_up_window_s=0,
                       scale_down_window_s=0, drain_timeout_s=0))
    assert (p.target_utilization, p.tolerance, p.scale_up_window_s) == (0.7, 0.1, 30.0)
    with pytest.raises(InvalidArgument) as err:
        checked(Policy(min_instances=5, max_instances=4))
    assert err.value.field == "policy.max_instances"


@pytest.mark.parametrize("current", range(0, 12))
def test_desired_never_leaves_the_bounds(current):
    policy = Policy(min_instances=2, max_instances=6)
    n, reason = desired(current, policy)
    assert 2 <= n <= 6 and n == bounded(current, policy) and reason
    assert desired(current, Policy(min_instances=2, max_instances=6, manual_instances=4))[0] == 4


def test_policy_and_state_import_neither_grpc_nor_stubs():
    import subprocess
    import sys

    code = ("import sys, scaler.policy, scaler.state; "
            "bad = [m for m in sys.modules if m.startswith(('grpc', 'llmesh'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
