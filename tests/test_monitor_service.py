"""The monitor over real gRPC channels, on port 0, against a fake router and fake instances."""

from __future__ import annotations

import asyncio
import logging
import math
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from monitor.config import MonitorConfig
from monitor.main import create_server
from services.common.stubs import monitor_pb2, monitor_pb2_grpc, router_pb2, stats_pb2, stats_pb2_grpc
from tests.conftest import free_port
from tests.test_monitor_fakes import FakeInstance, FakeRouter, eventually


def monitor_config(router: str, **overrides) -> MonitorConfig:
    values = {"port": 0, "router": router, "watch_interval_s": 0.05, "list_interval_s": 0.05,
              "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2, "analysis_interval_s": 0.05,
              "alert_for_s": 0.0, "alert_clear_s": 0.0, "alert_startup_grace_s": 0.0, "prometheus_port": 0,
              **overrides}
    return MonitorConfig.from_namespace(values, env={})


class Running:
    def __init__(self, app) -> None:
        self.app = app
        self.channel = grpc.aio.insecure_channel(app.address)
        self.stub = monitor_pb2_grpc.MonitorStub(self.channel)

    async def throughput(self, window_s=1.0, **scope) -> monitor_pb2.GetThroughputResponse:
        return await self.stub.GetThroughput(
            monitor_pb2.GetThroughputRequest(window_s=window_s, scope=monitor_pb2.Scope(**scope)))


@pytest.fixture
async def fake_router():
    router = await FakeRouter().start()
    yield router
    await router.stop()


@pytest.fixture
async def instances():
    started: list[FakeInstance] = []

    async def make(*args, **kw) -> FakeInstance:
        started.append(await FakeInstance(*args, **kw).start())
        return started[-1]

    yield make
    for i in started:
        await i.stop()


@pytest.fixture
async def monitor():
    running: list[Running] = []

    async def make(router: str, **overrides) -> Running:
        app = create_server(monitor_config(router, **overrides))
        await app.start()
        running.append(Running(app))
        return running[-1]

    yield make
    for r in running:
        await r.channel.close()
        await r.app.stop(0)


async def test_discovers_instances_and_measures_their_throughput(fake_router, instances, monitor):
    a = await instances("target-a", tokens_per_s=2000, requests_per_s=200, in_flight=3, queue_length=1)
    b = await instances("target-b", tokens_per_s=1000, requests_per_s=100, in_flight=1)
    fake_router.add("a", a.address, pool="fast")
    fake_router.add("b", b.address, pool="slow")
    mon = await monitor(fake_router.address)

    def close(m, tokens, requests) -> bool:
        return m.tokens_per_second == pytest.approx(tokens, rel=0.05) and \
            m.requests_per_second == pytest.approx(requests, rel=0.05)

    async def measured(expected, **scope):
        reply = await mon.throughput(window_s=1.0, **scope)
        return close(reply.metrics, *expected) and reply

    reply = await eventually(lambda: measured((3000, 300)))
    assert reply.metrics.instances == 2
    assert [w.window_s for w in reply.windows] == [10, 60, 300]  # the standard windows come along
    assert reply.metrics.in_flight == 4 and reply.metrics.queue_length == 1
    assert reply.metrics.utilization_source == stats_pb2.UTILIZATION_SOURCE_ENGINE_BUSY
    assert {"a", "b", "router@fake"} <= set(reply.per_instance)
    fast = await eventually(lambda: measured((2000, 200), pool="fast"))
    assert fast.metrics.instances == 1 and set(fast.per_instance) == {"a"}
    one = await eventually(lambda: measured((1000, 100), instance_id="b"))
    assert not one.per_instance  # only pools and the fleet list their instances
    by_report_id = await mon.throughput(instance_id="target-b")  # the id the instance reports itself
    assert by_report_id.metrics.instances == 1


async def test_an_instance_that_leaves_the_router_is_dropped(fake_router, instances, monitor):
    a = await instances("target-a", tokens_per_s=50)
    fake_router.add("a", a.address)
    mon = await monitor(fake_router.address)
    await eventually(lambda: _reporting(mon, "a"))
    assert a.stats.streams == 1

    fake_router.remove("a")

    async def gone():
        try:
            await mon.throughput(instance_id="a")
        except grpc.aio.AioRpcError as err:
            return err
    err = await eventually(gone)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "instance_id" in err.details()
    await eventually(lambda: a.stats.streams == 0)
    assert "a" not in (await mon.throughput()).per_instance


async def test_serves_before_the_router_is_up_and_follows_it_when_it_comes(instances, monitor, caplog):
    caplog.set_level(logging.INFO, logger="monitor.subscriber")
    port = free_port()
    mon = await monitor(f"127.0.0.1:{port}")
    health = await health_pb2_grpc.HealthStub(mon.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert (await mon.throughput()).metrics.instances == 0

    a = await instances("target-a", tokens_per_s=80)
    router = FakeRouter()
    router.add("a", a.address)
    await router.start(port)
    try:
        await eventually(lambda: _has_tokens(mon))
        before_stop = list(caplog.records)  # what was said while the router came up (not what its stop says)
    finally:
        await router.stop()
    # A router not up yet is a suite starting together, said at INFO; one that answered and then
    # stops is news (2026-12-01: every `llmesh up` logged a WARNING for the former).
    waiting = [r for r in before_stop if "not answering yet" in r.getMessage()]
    assert waiting and all(r.levelno == logging.INFO for r in waiting)
    assert not [r for r in before_stop if r.name == "monitor.subscriber" and r.levelno >= logging.WARNING]
    await eventually(lambda: _warned(caplog), what="a warning once the router that answered stops")


async def _warned(caplog) -> bool:
    return any(r.levelno == logging.WARNING and "ListInstances failed" in r.getMessage() for r in caplog.records)


async def _reporting(mon: Running, key: str) -> bool:
    return key in (await mon.throughput()).per_instance


async def _has_tokens(mon: Running) -> bool:
    return (await mon.throughput()).metrics.tokens_per_second > 0


@pytest.mark.parametrize("request_, field", [
    (monitor_pb2.GetThroughputRequest(window_s=-1), "window_s"),
    (monitor_pb2.GetThroughputRequest(window_s=301), "window_s"),
    (monitor_pb2.GetThroughputRequest(scope=monitor_pb2.Scope(pool="")), "scope.pool"),
    (monitor_pb2.GetThroughputRequest(scope=monitor_pb2.Scope(instance_id="a\nb")), "scope.instance_id"),
])
async def test_bad_requests_get_invalid_argument(fake_router, monitor, request_, field):
    mon = await monitor(fake_router.address)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mon.stub.GetThroughput(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()


async def test_analyze_and_alerts_follow_instance_health(fake_router, instances, monitor):
    a = await instances("target-a", tokens_per_s=10)
    status = fake_router.add("a", a.address, pool="p", healthy=False)
    mon = await monitor(fake_router.address)
    alerts = mon.stub.WatchAlerts(monitor_pb2.WatchAlertsRequest(min_severity=monitor_pb2.SEVERITY_WARNING))

    async def next_about(subject: str) -> monitor_pb2.Alert:
        # Other alerts may come first: the fleet's, before the router's first answer.
        while (alert := await alerts.read()).subject != subject:
            pass
        return alert

    fired = await asyncio.wait_for(next_about("p"), 10)
    assert (fired.rule, fired.subject, fired.firing) == ("no_healthy_instances", "p", True)
    assert fired.severity == monitor_pb2.SEVERITY_CRITICAL
    analysis = await mon.stub.Analyze(monitor_pb2.AnalyzeRequest(scope=monitor_pb2.Scope(pool="p")))
    assert [r.rule for r in analysis.recommendations] == ["no_healthy_instances"]
    assert analysis.recommendations[0].evidence["healthy"] == 0

    status.health = router_pb2.INSTANCE_HEALTH_SERVING
    cleared = await asyncio.wait_for(next_about("p"), 10)
    assert (cleared.rule, cleared.subject, cleared.firing) == ("no_healthy_instances", "p", False)
    alerts.cancel()


async def test_analyze_recommends_scaling_out_below_the_configured_target(fake_router, instances, monitor):
    a = await instances("target-a", tokens_per_s=500, requests_per_s=2, queue_length=3, running=8,
                        accelerator_utilization=0.95, batch_fill=1.0)
    fake_router.add("a", a.address, pool="p")
    mon = await monitor(fake_router.address, target_requests_per_second=10.0)

    async def scale_out():
        reply = await mon.stub.Analyze(monitor_pb2.AnalyzeRequest(window_s=1.0))
        return next((r for r in reply.recommendations if r.rule == "scale_out"), None)

    rec = await eventually(scale_out)
    assert rec.subject == "p" and rec.evidence["target_requests_per_second"] == 10
    assert rec.severity == monitor_pb2.SEVERITY_WARNING and rec.action and rec.expected_effect


async def test_prometheus_exposition(fake_router, instances, monitor):
    a = await instances("target-a", tokens_per_s=120,
                        ttft=stats_pb2.LatencySummary(p50_ms=40, p95_ms=90, p99_ms=120, mean_ms=50, count=8))
    idle = await instances("target-idle")  # no request finished in the window
    fake_router.add("a", a.address, pool="fast")
    fake_router.add("idle", idle.address, pool="fast")
    port = free_port()
    mon = await monitor(fake_router.address, prometheus_port=port)
    await eventually(lambda: _has_tokens(mon))

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    text = await asyncio.to_thread(scrape)
    assert 'llmesh_tokens_per_second{instance="a",pool="fast",role="target"}' in text
    assert 'llmesh_up{instance="a",pool="fast",role="target"} 1.0' in text
    assert 'llmesh_tokens_generated_total{instance="a",pool="fast",role="target"}' in text
    assert "python_gc" not in text  # its own registry, not the process-global one
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ttft = {(x.labels["instance"], x.labels["quantile"]): x.value for x in families["llmesh_ttft_seconds"].samples}
    assert ttft[("a", "0.95")] == pytest.approx(0.09)
    # An instance with no finished request has no percentile: NaN, not a 0 s that reads as instant.
    assert all(math.isnan(ttft[("idle", q)]) for q in ("0.5", "0.95", "0.99"))


async def test_serves_its_own_stats(fake_router, monitor):
    mon = await monitor(fake_router.address)
    call = stats_pb2_grpc.StatsStub(mon.channel).Watch(stats_pb2.WatchStatsRequest(interval_s=0.05))
    report = await call.read()
    call.cancel()
    assert report.role == stats_pb2.ROLE_MONITOR and report.instance_id.startswith("monitor@")


async def test_watch_streams_end_when_the_service_stops(fake_router):
    """Health, Stats and alert watches end (OK; health says NOT_SERVING last) as the
    service shuts down, rather than hold its graceful stop for the whole grace period
    and be cancelled at its end (which grpc logs as an ERROR)."""
    app = create_server(monitor_config(fake_router.address))
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    try:
        health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        stats = stats_pb2_grpc.StatsStub(channel).Watch(stats_pb2.WatchStatsRequest(interval_s=60))
        alerts = monitor_pb2_grpc.MonitorStub(channel).WatchAlerts(monitor_pb2.WatchAlertsRequest())
        async def rest(call) -> list:
            out = []
            while (reply := await call.read()) is not grpc.aio.EOF:
                out.append(reply)
            return out

        await health.read()
        await stats.read()
        stopping = asyncio.create_task(app.stop(30))
        statuses = [reply.status for reply in await rest(health)]
        assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await rest(stats) == []  # its next report was a minute away: it ended at once
        await rest(alerts)
        for call in (health, stats, alerts):
            assert await call.code() == grpc.StatusCode.OK
        await stopping
    finally:
        await channel.close()
