"""Hostile input, generated: every public RPC of every service gets requests
built from its protobuf descriptor with extreme values (huge and negative
integers, NaN and infinite floats, huge strings, enum values outside the
enum, repeated fields with many entries), half of them as mutations of a
valid request so that they reach past the first check. Whatever comes back,
never INTERNAL or UNKNOWN, never a traceback in a message, and the service
SERVING after every request.

In-process services on port 0: a draft and two targets (tiny models), a
router in front of one target (Generate, Complete, ListInstances) and one
with no instances for the registry's admin RPCs, a monitor and a scaler
watching the first router (its backend refuses every start).

``LLMESH_FUZZ_EXAMPLES`` sets the examples per RPC (default 40, which keeps
this file within a minute on 2 cores; e.g. 2000 for a long run).
"""

from __future__ import annotations

import math
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from google.protobuf.descriptor import FieldDescriptor as F

from monitor.config import MonitorConfig
from monitor.main import create_server as create_monitor
from router.config import RouterConfig
from router.main import create_server as create_router
from scaler.backends import Backend, BackendError
from scaler.config import ScalerConfig
from scaler.main import create_server as create_scaler
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import (model_pb2, model_pb2_grpc, monitor_pb2, monitor_pb2_grpc, router_pb2,
                                   router_pb2_grpc, scaler_pb2, scaler_pb2_grpc, stats_pb2, stats_pb2_grpc)
from services.draft.config import DraftConfig
from services.draft.main import create_server as create_draft
from services.target.config import TargetConfig
from services.target.main import create_server as create_target
from tests.conftest import eventually

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("LLMESH_FUZZ_EXAMPLES", "40"))
#: Derandomized (the same examples each run) unless LLMESH_FUZZ_RANDOM is set.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("LLMESH_FUZZ_RANDOM"), suppress_health_check=list(HealthCheck))
#: RPCs that cost a millisecond or two get three times as many.
FUZZ_CHEAP = settings(FUZZ, max_examples=3 * EXAMPLES)
SERVING = health_pb2.HealthCheckResponse.SERVING
#: Per-call deadline: long enough for a tiny model's full context, short enough for CI.
CALL_S = 1.5

# -- values --------------------------------------------------------------------------
INT32 = st.one_of(st.integers(-3, 40), st.sampled_from([-2**31, -1, 2**31 - 1, 2**16, 255, 256, 257]),
                  st.integers(-2**31, 2**31 - 1))
INT64 = st.one_of(INT32, st.sampled_from([-2**63, 2**63 - 1, 2**53 + 1]), st.integers(-2**63, 2**63 - 1))
UINT64 = st.one_of(st.integers(0, 40), st.sampled_from([0, 2**64 - 1, 2**63]), st.integers(0, 2**64 - 1))
DOUBLE = st.one_of(st.sampled_from([0.0, -0.0, 1e-39, 5e-324, 1e-45, 1.0, 0.5, 2.0, 1e38, 3.5e38, 1e300, -1.0,
                                    math.inf, -math.inf, math.nan]),
                   st.floats(allow_nan=True, allow_infinity=True))
FLOAT = st.one_of(st.sampled_from([0.0, -0.0, 1e-39, 1e-45, 1.0, 0.5, 2.0, 3.4e38, -1.0, math.inf, -math.inf,
                                   math.nan]),
                  st.floats(width=32, allow_nan=True, allow_infinity=True))
HUGE = "x" * (3 * 1024 * 1024)
#: Host:port-like strings, valid and not (addresses are the most common string input).
ADDRESSES = st.one_of(
    st.sampled_from(["127.0.0.1:1", "not an address", "host:\u00b2", "host:\u0663", "[::1]:50061", "[::1", ":80",
                     "h:0", "h:65536", "h:99999999999999999999", "a b:1", "h:-1", "h:+1", "h: 1", "\x00:1",
                     "dns:///h:1", "unix:/tmp/x", "h:1:2", "[]:1", "%:1"]),
    st.tuples(st.text(max_size=12), st.text(max_size=6)).map(lambda hp: f"{hp[0]}:{hp[1]}"))
TEXT = st.one_of(st.text(max_size=40), ADDRESSES,
                 st.sampled_from(["", " ", "default", "\u201c", "\x00", "a" * 300, "\ud7ff\ue000\U0010ffff"]),
                 st.just(HUGE), st.text(min_size=1000, max_size=5000))
SCALARS = {F.TYPE_INT32: INT32, F.TYPE_SINT32: INT32, F.TYPE_SFIXED32: INT32, F.TYPE_INT64: INT64,
           F.TYPE_SINT64: INT64, F.TYPE_SFIXED64: INT64, F.TYPE_UINT64: UINT64, F.TYPE_FIXED64: UINT64,
           F.TYPE_UINT32: st.integers(0, 2**32 - 1), F.TYPE_FIXED32: st.integers(0, 2**32 - 1),
           F.TYPE_DOUBLE: DOUBLE, F.TYPE_FLOAT: FLOAT, F.TYPE_BOOL: st.booleans(), F.TYPE_STRING: TEXT,
           F.TYPE_BYTES: st.one_of(st.binary(max_size=64), st.just(b"\xff" * 4096))}


def _value(field, depth):
    if field.type == F.TYPE_STRING and "address" in field.name:
        return st.one_of(ADDRESSES, TEXT)
    if field.type == F.TYPE_MESSAGE:
        return _message(field.message_type, depth + 1)
    if field.type == F.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 50),
                         st.just(2**31 - 1))
    return SCALARS[field.type]


def _repeated(field, depth):
    """A few entries, or thousands (one value repeated: cheap to draw)."""
    one = _value(field, depth)
    if field.type == F.TYPE_MESSAGE:
        return st.lists(one, max_size=3)
    if field.type in (F.TYPE_STRING, F.TYPE_BYTES):  # many short ones (thousands of huge ones: gigabytes)
        small, counts = (st.text(max_size=8) if field.type == F.TYPE_STRING else st.binary(max_size=8)), [2000]
    else:
        small, counts = one, [2000, 600 * 1024]
    return st.one_of(st.lists(one, max_size=5), st.tuples(small, st.sampled_from(counts)).map(
        lambda vn: [vn[0]] * vn[1]))


@st.composite
def _message(draw, descriptor, depth=0, template=None):
    """A message of ``descriptor``: each field kept from ``template`` or drawn."""
    from google.protobuf import message_factory

    msg = message_factory.GetMessageClass(descriptor)()
    if template is not None:
        msg.CopyFrom(template)
    if depth > 3:
        return msg
    oneofs = {}
    for field in descriptor.fields:
        if field.containing_oneof is not None and not field.containing_oneof.name.startswith("_"):
            oneofs.setdefault(field.containing_oneof.name, []).append(field)
            continue
        if template is not None and draw(st.booleans()):
            continue  # keep the template's value
        if not draw(st.booleans()) and template is None:
            continue  # leave unset
        _set(draw, msg, field, depth)
    for fields in oneofs.values():
        choice = draw(st.sampled_from([None, *fields]))
        if choice is not None and (template is None or draw(st.booleans())):
            _set(draw, msg, choice, depth)
    return msg


def _set(draw, msg, field, depth):
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        entries = draw(st.dictionaries(_value(key_f, depth), _value(value_f, depth), max_size=3)
                       | st.just({f"k{i}": "v" for i in range(200)}))
        target = getattr(msg, field.name)
        for k, v in entries.items():
            if value_f.type == F.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
        return
    if field.is_repeated:
        values = draw(_repeated(field, depth))
        target = getattr(msg, field.name)
        if field.type == F.TYPE_MESSAGE:
            for v in values:
                target.add().CopyFrom(v)
        else:
            target.extend(values)
        return
    value = draw(_value(field, depth))
    if field.type == F.TYPE_MESSAGE:
        sub = getattr(msg, field.name)
        sub.SetInParent()
        sub.CopyFrom(value)
    else:
        setattr(msg, field.name, value)


def requests(cls, template=None):
    """Random messages of ``cls``, half of them mutations of ``template``."""
    randoms = _message(cls.DESCRIPTOR)
    return st.one_of(randoms, _message(cls.DESCRIPTOR, template=template)) if template is not None else randoms


VALID_GENERATE = gen.GenerateRequest(prompt=gen.Prompt(text="The meaning of"),
                                     sampling=gen.SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9,
                                                                 top_k=8, seed=3, stop=["\n"]))
VALID_GENERATE.speculation.enabled = True
VALID_GENERATE.speculation.gamma = 3


# -- the services ----------------------------------------------------------------
class RefusingBackend(Backend):
    name = "refusing"

    async def start(self, spec):
        raise BackendError("this fuzzing backend starts nothing")

    async def stop(self, launched, grace_s):
        return None

    def problem(self, launched):
        return None


class Service:
    def __init__(self, app) -> None:
        self.app = app
        self.channel = grpc.aio.insecure_channel(app.address)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def serving(self) -> None:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == SERVING


@pytest.fixture(scope="module")
async def fleet(tiny_models):
    draft = create_draft(DraftConfig.from_namespace({"model": str(tiny_models.draft), "port": 0, "warmup": False},
                                                    env={}))
    await draft.start()
    target = create_target(TargetConfig.from_namespace({
        "model": str(tiny_models.target), "port": 0, "warmup": False, "draft_address": draft.address,
        "max_wait_ms": 0.0}, env={}))
    await target.start()
    router = create_router(RouterConfig.from_namespace({"port": 0, "http_port": 0, "targets": [target.address],
                                                        "drafts": [draft.address], "load_interval_s": 0.1},
                                                       env={}))
    await router.start()
    admin_router = create_router(RouterConfig.from_namespace({"port": 0, "http_port": 0}, env={}))
    await admin_router.start()
    monitor = create_monitor(MonitorConfig.from_namespace({"port": 0, "router": router.address,
                                                           "prometheus_port": 0}, env={}))
    await monitor.start()
    scaler = create_scaler(ScalerConfig.from_namespace({"port": 0, "router": router.address,
                                                        "monitor": monitor.address, "rpc_timeout_s": 1.0,
                                                        "interval_s": 0.5}, env={}), backend=RefusingBackend())
    await scaler.start()
    services = {name: Service(app) for name, app in (("draft", draft), ("target", target), ("router", router),
                                                     ("admin_router", admin_router), ("monitor", monitor),
                                                     ("scaler", scaler))}
    stub = router_pb2_grpc.RouterStub(services["router"].channel)

    async def routable():
        listed = (await stub.ListInstances(router_pb2.ListInstancesRequest())).instances
        return len(listed) == 2 and all(i.health == router_pb2.INSTANCE_HEALTH_SERVING for i in listed)

    await eventually(routable, what="the router to see its instances serving")
    yield services
    for s in services.values():
        await s.channel.close()
    for app in (scaler, monitor, admin_router, router, target, draft):
        await app.stop(0)


def check(err: grpc.aio.AioRpcError | None) -> None:
    if err is None:
        return
    assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (err.code(), err.details())
    assert "Traceback" not in (err.details() or ""), err.details()


async def unary(method, request, timeout=CALL_S) -> None:
    try:
        await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        check(exc)


async def stream(method, request, timeout=CALL_S, most=None) -> None:
    call = method(request, timeout=timeout)
    try:
        n = 0
        async for _ in call:
            n += 1
            if most is not None and n >= most:
                break
    except grpc.aio.AioRpcError as exc:
        check(exc)
    finally:
        call.cancel()


# -- the properties ------------------------------------------------------------------
@FUZZ
@given(req=requests(gen.GenerateRequest, VALID_GENERATE))
async def test_fuzz_target_generate(fleet, req):
    await stream(model_pb2_grpc.TargetModelStub(fleet["target"].channel).Generate, req)
    await fleet["target"].serving()


@FUZZ
@given(req=requests(gen.GenerateRequest, VALID_GENERATE), complete=st.booleans())
async def test_fuzz_router_generate_and_complete(fleet, req, complete):
    stub = router_pb2_grpc.RouterStub(fleet["router"].channel)
    if complete:
        await unary(stub.Complete, req)
    else:
        await stream(stub.Generate, req)
    await fleet["router"].serving()
    await fleet["target"].serving()


@FUZZ
@given(req=requests(model_pb2.ConfigureRequest), info=requests(model_pb2.GetInfoRequest),
       service=st.sampled_from(["target", "draft"]))
async def test_fuzz_model_configure_and_get_info(fleet, req, info, service):
    s = fleet[service]
    stub = (model_pb2_grpc.TargetModelStub if service == "target" else model_pb2_grpc.DraftModelStub)(s.channel)
    before = await stub.GetInfo(model_pb2.GetInfoRequest())
    await unary(stub.Configure, req)
    await unary(stub.GetInfo, info)
    await s.serving()
    # The engine works with what Configure accepted (a value it took and then
    # died on, as max_wait_ms = inf did, shows here).
    if service == "target":
        await stream(stub.Generate, gen.GenerateRequest(prompt=gen.Prompt(tokens=gen.TokenIds(ids=[5, 6])),
                                                        sampling=gen.SamplingParams(max_new_tokens=2)))
    else:
        await _propose(fleet, [PROPOSE_FIRST])
    await s.serving()
    # Put the knobs back, so that one example's settings do not slow the next ones.
    restore = model_pb2.ConfigureRequest(
        max_batch_size=before.settings.max_batch_size, max_wait_ms=before.settings.max_wait_ms,
        max_batch_tokens=before.settings.max_batch_tokens, max_queue=before.settings.max_queue)
    if service == "target":
        for name in ("speculation_default", "gamma_min", "gamma", "gamma_max", "draft_address"):
            setattr(restore, name, getattr(before.settings, name))
    await stub.Configure(restore)


PROPOSE_FIRST = model_pb2.ProposeRequest(request_id="fuzz", append_tokens=[5, 6, 7], gamma=3,
                                         sampling=gen.SamplingParams(temperature=0.8, top_k=5, seed=1))


@FUZZ
@given(msgs=st.lists(requests(model_pb2.ProposeRequest, PROPOSE_FIRST), min_size=1, max_size=4))
async def test_fuzz_draft_propose(fleet, msgs):
    await _propose(fleet, msgs)
    await fleet["draft"].serving()


async def _propose(fleet, msgs) -> None:
    call = model_pb2_grpc.DraftModelStub(fleet["draft"].channel).Propose(timeout=CALL_S)
    try:
        for msg in msgs:
            await call.write(msg)
            reply = await call.read()
            if reply is grpc.aio.EOF:
                break
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        check(exc)
    except grpc.aio.UsageError:
        pass  # the stream had already ended with a status, checked below
    finally:
        call.cancel()
    if call.done():
        code = await call.code()
        if code != grpc.StatusCode.CANCELLED:
            check(None if code == grpc.StatusCode.OK else _Status(code, await call.details()))


class _Status:
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@FUZZ_CHEAP
@given(register=requests(router_pb2.RegisterInstanceRequest, router_pb2.RegisterInstanceRequest(
    instance=router_pb2.InstanceSpec(id="fuzzed", address="127.0.0.1:1", role=stats_pb2.ROLE_TARGET, pool="p"))),
       drain=requests(router_pb2.DrainInstanceRequest), deregister=requests(router_pb2.DeregisterInstanceRequest),
       listing=requests(router_pb2.ListInstancesRequest))
async def test_fuzz_router_admin(fleet, register, drain, deregister, listing):
    stub = router_pb2_grpc.RouterStub(fleet["admin_router"].channel)
    await unary(stub.RegisterInstance, register)
    await unary(stub.ListInstances, listing)
    await unary(stub.DrainInstance, drain)
    await unary(stub.DeregisterInstance, deregister)
    await unary(router_pb2_grpc.RouterStub(fleet["router"].channel).ListInstances, listing)
    await fleet["admin_router"].serving()
    for inst in (await stub.ListInstances(router_pb2.ListInstancesRequest())).instances:
        await stub.DeregisterInstance(router_pb2.DeregisterInstanceRequest(id=inst.spec.id))


@FUZZ_CHEAP
@given(throughput=requests(monitor_pb2.GetThroughputRequest), analyze=requests(monitor_pb2.AnalyzeRequest),
       alerts=requests(monitor_pb2.WatchAlertsRequest))
async def test_fuzz_monitor(fleet, throughput, analyze, alerts):
    stub = monitor_pb2_grpc.MonitorStub(fleet["monitor"].channel)
    await unary(stub.GetThroughput, throughput)
    await unary(stub.Analyze, analyze)
    await stream(stub.WatchAlerts, alerts, timeout=0.02, most=1)
    await fleet["monitor"].serving()


@FUZZ_CHEAP
@given(policy=requests(scaler_pb2.SetPolicyRequest, scaler_pb2.SetPolicyRequest(
           pool="fuzz", policy=scaler_pb2.ScalingPolicy(min_instances=0, max_instances=2))),
       scale=requests(scaler_pb2.ScaleToRequest, scaler_pb2.ScaleToRequest(pool="fuzz", instances=1)),
       history=requests(scaler_pb2.GetHistoryRequest), events=requests(scaler_pb2.WatchEventsRequest))
async def test_fuzz_scaler(fleet, policy, scale, history, events):
    stub = scaler_pb2_grpc.ScalerStub(fleet["scaler"].channel)
    await unary(stub.SetPolicy, policy)
    await unary(stub.ScaleTo, scale)
    await unary(stub.GetStatus, scaler_pb2.GetStatusRequest())
    await unary(stub.GetHistory, history)
    await stream(stub.WatchEvents, events, timeout=0.02, most=1)
    await fleet["scaler"].serving()


@FUZZ_CHEAP
@given(req=requests(stats_pb2.WatchStatsRequest), service=st.sampled_from(
    ["draft", "target", "router", "monitor", "scaler"]))
async def test_fuzz_stats_watch(fleet, req, service):
    await stream(stats_pb2_grpc.StatsStub(fleet[service].channel).Watch, req, timeout=0.3, most=1)
    await fleet[service].serving()


@FUZZ_CHEAP
@given(data=st.binary(max_size=64), method=st.sampled_from([
    ("target", "/llmesh.v1.TargetModel/Configure"), ("router", "/llmesh.v1.Router/RegisterInstance"),
    ("monitor", "/llmesh.v1.Monitor/GetThroughput"), ("scaler", "/llmesh.v1.Scaler/SetPolicy"),
    ("draft", "/llmesh.v1.DraftModel/GetInfo")]))
async def test_fuzz_raw_bytes(fleet, data, method):
    service, path = method
    call = fleet[service].channel.unary_unary(path, request_serializer=lambda b: b,
                                               response_deserializer=lambda b: b)
    await unary(call, data)
    await fleet[service].serving()

