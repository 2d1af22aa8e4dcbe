"""An instance is routable only once it answers as the role it was registered
with, and every status an upstream can return is classified once: the
request's own fault reaches the client as it came, the instance's is tried
elsewhere and counted against it, and never reaches the client as is."""

from __future__ import annotations

import contextlib

import grpc
import pytest

from monitor.config import MonitorConfig
from monitor.main import create_server as create_monitor
from router.failover import FAULTS, Fault, fault_of
from router.registry import Health, Identity, InstanceSpec, ModelIdentity, Registry, Role
from services.common.stubs import router_pb2, stats_pb2
from tests.conftest import eventually, hf_greedy
from tests.router_helpers import (FakeTarget, bare_instance, collect, fake_target, register, request, routable,
                                  running_router, start_target, wait_routable)


# -- the classification, pure ----------------------------------------------------
def test_every_status_code_is_classified_in_one_place():
    codes = {c.name for c in grpc.StatusCode} - {"OK"}
    assert set(FAULTS) == codes
    assert {c for c in codes if FAULTS[c] is Fault.REQUEST} == {
        "INVALID_ARGUMENT", "OUT_OF_RANGE", "NOT_FOUND", "ALREADY_EXISTS", "DEADLINE_EXCEEDED"}
    assert fault_of("UNIMPLEMENTED") is Fault.WRONG_KIND
    assert fault_of("SOMETHING_NEW") is Fault.INSTANCE  # unknown codes are never the client's


def test_registry_routes_only_to_instances_confirmed_as_their_role():
    from services.common.load import LoadReport

    reg = Registry()
    target, _ = reg.upsert(InstanceSpec("t", "h:1", Role.TARGET))
    draft, _ = reg.upsert(InstanceSpec("d", "h:2", Role.DRAFT))
    for inst in (target, draft):
        reg.set_health(inst.id, Health.SERVING)
        reg.record_load(inst.id, LoadReport(), 0.0)
    assert not target.routable(0.0, 2.0) and "not yet confirmed as a target" in target.describe(0.0, 2.0)
    reg.set_identity("t", ModelIdentity(Role.MONITOR))
    assert target.identity is Identity.WRONG and target.effective_health(0.0, 2.0) is Health.NOT_SERVING
    assert "answers GetInfo as a monitor" in target.describe(0.0, 2.0)
    reg.set_identity("t", ModelIdentity(Role.TARGET, tokenizer_hash="aaa"))
    assert target.routable(0.0, 2.0)
    # A draft must share its pool's targets' tokenizer (when they report one).
    reg.set_identity("d", ModelIdentity(Role.DRAFT, tokenizer_hash="bbb"))
    assert not draft.routable(0.0, 2.0) and "tokenizer" in draft.describe(0.0, 2.0)
    reg.set_identity("t", ModelIdentity(Role.TARGET, tokenizer_hash="bbb"))  # the target changed: drafts re-judged
    assert draft.routable(0.0, 2.0)
    # Health leaving SERVING forgets the identity: a restarted server is asked again.
    reg.set_health("t", Health.NOT_SERVING, "unreachable")
    reg.set_health("t", Health.SERVING)
    assert target.identity is Identity.UNCHECKED and not target.routable(0.0, 2.0)


# -- over real channels --------------------------------------------------------------
@contextlib.asynccontextmanager
async def running_monitor():
    config = MonitorConfig.from_namespace({"port": 0, "router": "127.0.0.1:9", "prometheus_port": 0}, env={})
    app = create_monitor(config)
    await app.start()
    try:
        yield app
    finally:
        await app.stop(0)


async def listed(stub, instance_id):
    reply = await stub.ListInstances(router_pb2.ListInstancesRequest())
    return next(i for i in reply.instances if i.spec.id == instance_id)


async def test_a_monitor_registered_as_a_target_is_never_routable(tiny_models, reference_model):
    async with running_monitor() as monitor, running_router() as (app, stub, _):
        await register(stub, "1-monitor", monitor.address)
        await eventually(lambda: app.upstreams.registry.get("1-monitor").identity is Identity.WRONG,
                         what="the monitor to be found out")
        status = await listed(stub, "1-monitor")
        assert status.health == router_pb2.INSTANCE_HEALTH_NOT_SERVING
        for i in range(8):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, request([1, 2, i], max_new_tokens=2))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "1-monitor not a target: target-model GetInfo answered UNIMPLEMENTED" in err.value.details()
        target = await start_target(tiny_models)
        try:
            await register(stub, "2-real", target.address)
            await wait_routable(stub, ["2-real"])
            for i in range(4):
                prompt = [1, 2, 3 + i]
                tokens, chunks = await collect(stub, request(prompt, max_new_tokens=3))
                assert tokens == hf_greedy(reference_model, prompt, 3) and chunks[-1].instance_id == "2-real"
            assert not await routable(stub, ["1-monitor"])
        finally:
            await target.stop(0)


async def test_drafts_must_answer_as_drafts_with_their_targets_tokenizer(tiny_models):
    target = await start_target(tiny_models)
    proxy = FakeTarget(upstream=target.address)
    good = target.loaded.tokenizer_hash
    try:
        async with contextlib.AsyncExitStack() as stack:
            _, address = await stack.enter_async_context(fake_target(proxy))
            _, as_target = await stack.enter_async_context(
                bare_instance(stats_pb2.ROLE_DRAFT, info_role=stats_pb2.ROLE_TARGET))
            _, other_tokenizer = await stack.enter_async_context(
                bare_instance(stats_pb2.ROLE_DRAFT, tokenizer_hash="0" * 64))
            _, no_model = await stack.enter_async_context(bare_instance(stats_pb2.ROLE_DRAFT, info=False))
            _, right = await stack.enter_async_context(bare_instance(stats_pb2.ROLE_DRAFT, tokenizer_hash=good))
            app, stub, _ = await stack.enter_async_context(
                running_router([address], drafts=[as_target, other_tokenizer, no_model]))
            await wait_routable(stub, [address])
            registry = app.upstreams.registry
            await eventually(lambda: all(registry.get(d).identity is Identity.WRONG
                                         for d in (as_target, other_tokenizer, no_model)),
                             what="the wrong drafts to be found out")
            problems = {d: registry.get(d).describe(0.0, 1e9) for d in (as_target, other_tokenizer, no_model)}
            assert "answers GetInfo as a target" in problems[as_target]
            assert "tokenizer" in problems[other_tokenizer]
            assert "draft-model GetInfo answered UNIMPLEMENTED" in problems[no_model]
            await collect(stub, request([1, 2], max_new_tokens=2))
            assert proxy.requests[-1].draft_address == ""  # no draft fit to be sent
            await register(stub, right, right, role=stats_pb2.ROLE_DRAFT)
            await wait_routable(stub, [right])
            await collect(stub, request([1, 2], max_new_tokens=2))
            assert proxy.requests[-1].draft_address == right
    finally:
        await target.stop(0)


#: Codes a fake instance fails a request with before its first token.
CODES = [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK]


async def test_each_upstream_status_is_passed_on_or_tried_elsewhere_as_classified(tiny_models, reference_model):
    """For every status code: the request's own fault reaches the client as
    it came and is not held against the instance; any other is tried on the
    next instance (the client sees the answer) and, unless the instance was
    only full, counted against it."""
    target = await start_target(tiny_models)
    failing = FakeTarget()
    try:
        async with fake_target(failing) as (_, address), \
                running_router(eject_after_failures=0) as (app, stub, _):
            await register(stub, "1-failing", address)
            await register(stub, "2-real", target.address)
            registry = app.upstreams.registry
            for i, code in enumerate(CODES):
                await wait_routable(stub, ["1-failing", "2-real"])
                failing.fail = code
                tried, failures = len(failing.requests), registry.get("1-failing").consecutive_failures
                outcomes = []
                for j in range(2):  # round robin: one of the two starts on the failing instance
                    prompt = [3, i + 1, j + 1]
                    try:
                        tokens, chunks = await collect(stub, request(prompt, max_new_tokens=3))
                        assert tokens == hf_greedy(reference_model, prompt, 3)
                        assert chunks[-1].instance_id == "2-real"
                        outcomes.append("served")
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == code, code  # passed on as it came
                        assert "fake failure before the first token" in exc.details()
                        outcomes.append("failed")
                assert len(failing.requests) == tried + 1, code
                fault = FAULTS[code.name]
                if fault is Fault.REQUEST:
                    assert sorted(outcomes) == ["failed", "served"], code
                else:
                    assert outcomes == ["served", "served"], code
                counted = registry.get("1-failing").consecutive_failures - failures
                assert counted == (0 if fault in (Fault.REQUEST, Fault.BUSY, Fault.CUT_OFF) else 1), code
                registry.record_success("1-failing")
    finally:
        await target.stop(0)


async def test_an_instance_fault_with_nowhere_else_to_go_is_the_routers_unavailable(tiny_models):
    for code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.PERMISSION_DENIED):
        failing = FakeTarget(fail=code)
        async with fake_target(failing) as (_, address), running_router([address]) as (_, stub, _):
            await wait_routable(stub, [address])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, request([1, 2], max_new_tokens=2))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"last error from {address}: {code.name}" in err.value.details()
            assert "Traceback" not in err.value.details()
