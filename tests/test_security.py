"""TLS on every hop and the admin boundary, over real channels on port 0.

A TLS suite in-process (draft, target, router, monitor, scaler; certificates
from `llmesh certs`): generation works over TLS, plaintext and certificate-less
clients are refused where they must be, admin RPCs of every service are
refused without a credential and allowed with one, and the suite's own callers
(scaler -> router) present theirs. Then the same admin boundary on plaintext
with an admin token, and on a non-loopback plaintext host (--insecure).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import grpc
import httpx2 as httpx
import pytest

from monitor.config import MonitorConfig
from monitor.main import create_server as create_monitor
from router.config import RouterConfig
from router.main import create_server as create_router
from scaler.config import ScalerConfig
from scaler.main import create_server as create_scaler
from services.cli.certs import files, make_certs
from services.common.access import bearer_metadata
from services.common.healthcheck import UNREACHABLE, check
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import (model_pb2, model_pb2_grpc, monitor_pb2, monitor_pb2_grpc, router_pb2,
                                   router_pb2_grpc, scaler_pb2, scaler_pb2_grpc, stats_pb2)
from services.draft.config import DraftConfig
from services.draft.main import create_server as create_draft
from services.target.config import TargetConfig
from services.target.main import create_server as create_target
from tests.conftest import eventually, free_port
from tests.test_scaler_fakes import FakeBackend

ADMIN = "adm1n-t0ken"
DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def tls_values(certs, name: str) -> dict[str, str]:
    f = files(certs, name)
    return {"tls_cert": str(f.cert), "tls_key": str(f.key), "tls_ca": str(f.ca)}


def request(n: int = 4, **speculation) -> gen.GenerateRequest:
    return gen.GenerateRequest(prompt=gen.Prompt(tokens=gen.TokenIds(ids=[5, 6, 7])),
                               sampling=gen.SamplingParams(max_new_tokens=n, ignore_eos=True),
                               speculation=gen.SpeculationParams(**speculation))


async def generate(stub, req, **kw) -> tuple[list[int], gen.GenerateChunk]:
    chunks = [c async for c in stub.Generate(req, **kw)]
    return [t for c in chunks for t in c.token_ids], chunks[-1]


def tls_channel(address: str, ca: bytes, key: bytes | None = None, cert: bytes | None = None) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert))


def client_channel(address: str, certs, name: str) -> grpc.aio.Channel:
    f = files(certs, name)
    return tls_channel(address, f.ca.read_bytes(), f.key.read_bytes(), f.cert.read_bytes())


async def code_of(call) -> grpc.StatusCode | None:
    """The status a call ends with (None: OK)."""
    try:
        result = call()
        if hasattr(result, "__aiter__"):
            [_ async for _ in result]
        else:
            await result
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return None


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls") / "certs"
    make_certs(directory)
    return directory


@pytest.fixture(scope="module")
async def tls_suite(tiny_models, certs):
    """draft <-mTLS- target <-mTLS- router (public port: server-auth TLS), all with the admin token."""
    draft = create_draft(DraftConfig.from_namespace(
        {"model": str(tiny_models.draft), "port": 0, "admin_token": ADMIN, **tls_values(certs, "draft")}, env={}))
    await draft.start()
    target = create_target(TargetConfig.from_namespace(
        {"model": str(tiny_models.target), "port": 0, "max_batch_size": 4, "warmup": False,
         "draft_address": draft.address, "admin_token": ADMIN, **tls_values(certs, "target")}, env={}))
    await target.start()
    router = create_router(RouterConfig.from_namespace(
        {"port": 0, "http_port": free_port(), "targets": [target.address], "drafts": [draft.address],
         "load_interval_s": 0.1,
         "admin_token": ADMIN, **tls_values(certs, "router")}, env={}))
    await router.start()
    channel = client_channel(router.address, certs, "cli")
    stub = router_pb2_grpc.RouterStub(channel)

    async def routable() -> bool:
        reply = await stub.ListInstances(router_pb2.ListInstancesRequest())
        return sum(i.health == router_pb2.INSTANCE_HEALTH_SERVING for i in reply.instances) == 2

    await eventually(routable, what="the router to see its target and draft over mTLS")
    yield {"draft": draft, "target": target, "router": router}
    await channel.close()
    for app in (router, target, draft):
        await app.stop(0)


# -- TLS on every hop ----------------------------------------------------------------
async def test_generation_works_over_tls_with_a_server_auth_only_client(tls_suite, certs):
    ca = (certs / "ca.crt").read_bytes()
    async with tls_channel(tls_suite["router"].address, ca) as channel:  # no client certificate
        tokens, last = await generate(router_pb2_grpc.RouterStub(channel), request(6, enabled=True, gamma=2))
    assert len(tokens) == 6
    assert last.speculation.proposed_tokens > 0  # the target reached its draft over mutual TLS


async def test_the_http_front_door_serves_https_with_the_routers_certificate(tls_suite, certs):
    router = tls_suite["router"]
    url = f"https://127.0.0.1:{router.http.port}"
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    async with httpx.AsyncClient(verify=context, timeout=60) as http:
        reply = await http.post(f"{url}/v1/completions", json={"model": "target", "prompt": [5, 6, 7],
                                                                "max_tokens": 3, "ignore_eos": True})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    async with httpx.AsyncClient(timeout=10) as http:  # a client that does not trust the CA is refused
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{url}/health")


async def test_with_tls_client_auth_the_http_front_door_asks_for_a_client_certificate(tls_suite, certs):
    """--tls-client-auth on the router holds for its HTTP port as for its gRPC port."""
    router = create_router(RouterConfig.from_namespace(
        {"port": 0, "http_port": free_port(), "targets": [tls_suite["target"].address], "tls_client_auth": True,
         **tls_values(certs, "router")}, env={}))
    await router.start()
    try:
        url = f"https://127.0.0.1:{router.http.port}"
        trusting = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        async with httpx.AsyncClient(verify=trusting, timeout=10) as http:  # trusts the server, no certificate
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                await http.get(f"{url}/v1/models")
        f = files(certs, "cli")
        presenting = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        presenting.load_cert_chain(str(f.cert), str(f.key))
        async with httpx.AsyncClient(verify=presenting, timeout=10) as http:
            assert (await http.get(f"{url}/v1/models")).status_code == 200
    finally:
        await router.stop(0)


async def test_a_plaintext_client_is_refused_by_every_service(tls_suite):
    for name, app in tls_suite.items():
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = (router_pb2_grpc.RouterStub(channel).ListInstances if name == "router"
                    else model_pb2_grpc.TargetModelStub(channel).GetInfo if name == "target"
                    else model_pb2_grpc.DraftModelStub(channel).GetInfo)
            req = router_pb2.ListInstancesRequest() if name == "router" else model_pb2.GetInfoRequest()
            assert await code_of(lambda: stub(req, timeout=5)) == grpc.StatusCode.UNAVAILABLE, name


async def test_internal_hops_refuse_a_client_without_a_llmesh_certificate(tls_suite, certs, tmp_path):
    ca = (certs / "ca.crt").read_bytes()
    stranger = tmp_path / "stranger"
    make_certs(stranger, names=("cli",))  # a certificate of another CA
    s = files(stranger, "cli")
    for name in ("target", "draft"):
        address = tls_suite[name].address
        stub_of = model_pb2_grpc.TargetModelStub if name == "target" else model_pb2_grpc.DraftModelStub
        for channel in (tls_channel(address, ca), tls_channel(address, ca, s.key.read_bytes(), s.cert.read_bytes())):
            async with channel:
                code = await code_of(lambda: stub_of(channel).GetInfo(model_pb2.GetInfoRequest(), timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE, name
        async with client_channel(address, certs, "monitor") as channel:
            info = await stub_of(channel).GetInfo(model_pb2.GetInfoRequest(), timeout=5)
        assert info.vocab_size > 0
        # the healthcheck presents the same credentials
        assert await asyncio.to_thread(check, address, tls=files(certs, "cli")) == "SERVING"
        assert await asyncio.to_thread(check, address) == UNREACHABLE


async def test_the_monitor_watches_every_service_over_tls(tls_suite, certs):
    monitor = create_monitor(MonitorConfig.from_namespace(
        {"port": 0, "router": tls_suite["router"].address, "list_interval_s": 0.1, "watch_interval_s": 0.1,
         "prometheus_port": 0, **tls_values(certs, "monitor")}, env={}))
    await monitor.start()
    try:
        async with client_channel(monitor.address, certs, "cli") as channel:
            stub = monitor_pb2_grpc.MonitorStub(channel)

            async def instances() -> bool:
                reply = await stub.GetThroughput(monitor_pb2.GetThroughputRequest(window_s=10))
                return reply.metrics.instances >= 1  # serving targets: heard over mTLS

            await eventually(instances, what="the monitor to hear from the target over mTLS")
    finally:
        await monitor.stop(0)


# -- the admin boundary over TLS -------------------------------------------------------
async def test_model_services_admin_needs_an_admin_certificate_or_the_token(tls_suite, certs):
    for name in ("target", "draft"):
        address = tls_suite[name].address
        stub_of = model_pb2_grpc.TargetModelStub if name == "target" else model_pb2_grpc.DraftModelStub
        async with client_channel(address, certs, "router") as channel:
            configure = stub_of(channel).Configure
            assert await code_of(lambda: configure(model_pb2.ConfigureRequest())) == \
                grpc.StatusCode.PERMISSION_DENIED
            assert await code_of(lambda: configure(model_pb2.ConfigureRequest(),
                                                   metadata=bearer_metadata("wrong"))) == \
                grpc.StatusCode.UNAUTHENTICATED
            assert await code_of(lambda: configure(model_pb2.ConfigureRequest(),
                                                   metadata=bearer_metadata(ADMIN))) is None
        for admin in ("cli", "scaler"):
            async with client_channel(address, certs, admin) as channel:
                reply = await stub_of(channel).Configure(model_pb2.ConfigureRequest())
            assert reply.settings.max_batch_size > 0


async def test_router_admin_over_tls_needs_the_token_generate_does_not(tls_suite, certs):
    router = tls_suite["router"]
    async with tls_channel(router.address, (certs / "ca.crt").read_bytes()) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        spec = router_pb2.InstanceSpec(id="evil", address="127.0.0.1:9", role=stats_pb2.ROLE_TARGET)
        admin = [lambda md: stub.RegisterInstance(router_pb2.RegisterInstanceRequest(instance=spec), metadata=md),
                 lambda md: stub.DrainInstance(router_pb2.DrainInstanceRequest(id="evil"), metadata=md),
                 lambda md: stub.DeregisterInstance(router_pb2.DeregisterInstanceRequest(id="evil"), metadata=md)]
        for rpc in admin:
            assert await code_of(lambda: rpc(None)) == grpc.StatusCode.UNAUTHENTICATED
            assert await code_of(lambda: rpc(bearer_metadata("wrong"))) == grpc.StatusCode.UNAUTHENTICATED
        listed = (await stub.ListInstances(router_pb2.ListInstancesRequest())).instances
        assert "evil" not in {i.spec.id for i in listed}
        for rpc in admin:
            assert await code_of(lambda: rpc(bearer_metadata(ADMIN))) is None
        tokens, _ = await generate(stub, request(3))
        assert len(tokens) == 3


async def test_the_scaler_registers_and_drains_at_a_tls_router_with_its_credential(tls_suite, certs):
    router = tls_suite["router"]
    scaler = create_scaler(ScalerConfig.from_namespace(
        {"port": 0, "router": router.address, "monitor": f"127.0.0.1:{free_port()}", "admin_token": ADMIN,
         **tls_values(certs, "scaler")}, env={}), backend=FakeBackend())
    await scaler.start()
    try:
        await scaler.router.register("scaled-1", "127.0.0.1:9", "default")
        assert await scaler.router.drain("scaled-1")
        await scaler.router.deregister("scaled-1")
        assert await scaler.router.refresh()
    finally:
        await scaler.stop(0)


# -- the admin boundary on plaintext ---------------------------------------------------
@contextlib.asynccontextmanager
async def plaintext_services(tiny_models, host: str = "127.0.0.1", **values):
    """target, draft, router, scaler on plaintext ``host`` with ``values`` (admin token, ...)."""
    common = {"port": 0, "host": host, **values}
    draft = create_draft(DraftConfig.from_namespace({"model": str(tiny_models.draft), **common}, env={}))
    await draft.start()
    target = create_target(TargetConfig.from_namespace(
        {"model": str(tiny_models.target), "max_batch_size": 4, "warmup": False, **common}, env={}))
    await target.start()
    router = create_router(RouterConfig.from_namespace({"http_port": 0, "targets": [f"127.0.0.1:{target.port}"],
                                                        "load_interval_s": 0.1, **common}, env={}))
    await router.start()
    scaler = create_scaler(ScalerConfig.from_namespace(
        {"router": f"127.0.0.1:{router.port}", "monitor": f"127.0.0.1:{free_port()}", **common}, env={}),
        backend=FakeBackend())
    await scaler.start()
    apps = {"draft": draft, "target": target, "router": router, "scaler": scaler}
    channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") for name, app in apps.items()}
    try:
        yield {"router": router_pb2_grpc.RouterStub(channels["router"]),
               "scaler": scaler_pb2_grpc.ScalerStub(channels["scaler"]),
               "target": model_pb2_grpc.TargetModelStub(channels["target"]),
               "draft": model_pb2_grpc.DraftModelStub(channels["draft"])}
    finally:
        for channel in channels.values():
            await channel.close()
        for app in (scaler, router, target, draft):
            await app.stop(0)


def admin_calls(stubs):
    """One call per admin RPC of every service: name -> call(metadata)."""
    r, s = stubs["router"], stubs["scaler"]
    spec = router_pb2.InstanceSpec(id="x", address="127.0.0.1:9", role=stats_pb2.ROLE_TARGET)
    return {
        "Router.RegisterInstance": lambda md: r.RegisterInstance(router_pb2.RegisterInstanceRequest(instance=spec),
                                                                 metadata=md),
        "Router.DrainInstance": lambda md: r.DrainInstance(router_pb2.DrainInstanceRequest(id="x"), metadata=md),
        "Router.DeregisterInstance": lambda md: r.DeregisterInstance(router_pb2.DeregisterInstanceRequest(id="x"),
                                                                     metadata=md),
        "Scaler.SetPolicy": lambda md: s.SetPolicy(scaler_pb2.SetPolicyRequest(
            pool="default", policy=scaler_pb2.ScalingPolicy(min_instances=1, max_instances=2)), metadata=md),
        "Scaler.ScaleTo": lambda md: s.ScaleTo(scaler_pb2.ScaleToRequest(pool="default", instances=0), metadata=md),
        "TargetModel.Configure": lambda md: stubs["target"].Configure(model_pb2.ConfigureRequest(), metadata=md),
        "DraftModel.Configure": lambda md: stubs["draft"].Configure(model_pb2.ConfigureRequest(), metadata=md),
    }


async def public_calls_work(stubs) -> None:
    tokens, _ = await generate(stubs["router"], request(2))
    assert len(tokens) == 2
    assert (await stubs["target"].GetInfo(model_pb2.GetInfoRequest())).vocab_size > 0
    assert (await stubs["draft"].GetInfo(model_pb2.GetInfoRequest())).vocab_size > 0
    await stubs["scaler"].GetStatus(scaler_pb2.GetStatusRequest())
    await stubs["router"].ListInstances(router_pb2.ListInstancesRequest())


async def test_each_admin_rpc_of_each_service_needs_the_admin_token(tiny_models):
    async with plaintext_services(tiny_models, admin_token=ADMIN) as stubs:
        calls = admin_calls(stubs)
        assert len(calls) == 7
        for name, call in calls.items():
            assert await code_of(lambda: call(None)) == grpc.StatusCode.UNAUTHENTICATED, name
            assert await code_of(lambda: call(bearer_metadata("wrong"))) == grpc.StatusCode.UNAUTHENTICATED, name
        for name, call in calls.items():
            assert await code_of(lambda: call(bearer_metadata(ADMIN))) is None, name
        await public_calls_work(stubs)


async def test_the_client_token_does_not_open_admin_rpcs(tiny_models):
    async with plaintext_services(tiny_models, admin_token=ADMIN, auth_token="client") as stubs:
        r = stubs["router"]
        calls = {k: v for k, v in admin_calls(stubs).items() if k.startswith("Router.")}
        for name, call in calls.items():
            assert await code_of(lambda: call(bearer_metadata("client"))) == grpc.StatusCode.PERMISSION_DENIED, name
            assert await code_of(lambda: call(bearer_metadata(ADMIN))) is None, name
        tokens, _ = await generate(r, request(2), metadata=bearer_metadata("client"))
        assert len(tokens) == 2
        assert await code_of(lambda: r.Generate(request(2))) == grpc.StatusCode.UNAUTHENTICATED


async def test_plaintext_on_a_non_loopback_host_refuses_admin_without_a_token(tiny_models):
    async with plaintext_services(tiny_models, host="0.0.0.0", insecure=True) as stubs:
        for name, call in admin_calls(stubs).items():
            code = await code_of(lambda: call(None))
            assert code == grpc.StatusCode.UNAUTHENTICATED, name
            assert code in DENIED
        await public_calls_work(stubs)


async def test_admin_stays_open_on_plaintext_loopback_without_a_token(tiny_models):
    async with plaintext_services(tiny_models) as stubs:
        for name, call in admin_calls(stubs).items():
            assert await code_of(lambda: call(None)) is None, name


async def test_the_container_healthcheck_takes_its_certificate_from_the_environment(tls_suite, certs,
                                                                                     monkeypatch, capsys):
    from services.common.healthcheck import main

    address = tls_suite["target"].address
    assert await asyncio.to_thread(main, [address]) == 1  # plaintext: no answer
    f = files(certs, "target")
    monkeypatch.setenv("LLMESH_TLS_CERT", str(f.cert))
    monkeypatch.setenv("LLMESH_TLS_KEY", str(f.key))
    monkeypatch.setenv("LLMESH_TLS_CA", str(f.ca))
    assert await asyncio.to_thread(main, [address]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{address}: {UNREACHABLE}", f"{address}: SERVING"]
