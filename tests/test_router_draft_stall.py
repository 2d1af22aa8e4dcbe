"""A draft that is alive but silent (its engine stuck behind a SERVING health)
costs a request at most two round deadlines and the next request none: the
request stops speculating, the target stops opening streams to that draft,
the router stops choosing it, and all of them take it back once it answers."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
from opentelemetry.sdk.trace import TracerProvider

from router.failover import DRAFT_STALL_TIMEOUTS, DraftVerdict, draft_verdict
from router.registry import Health, Identity, InstanceSpec, ModelIdentity, Registry, Role, State
from services.common.config import BaseConfig
from services.common.load import LoadReport
from services.common.server import new_server
from services.common.stats_service import StatsServicer
from services.common.stubs import SERVICE_NAMES
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2, model_pb2_grpc, router_pb2, stats_pb2, stats_pb2_grpc
from services.speculative.speculator import MAX_CONSECUTIVE_TIMEOUTS
from tests.conftest import eventually, hf_greedy
from tests.router_helpers import (FakeTarget, collect, fake_target, request, running_router, start_target,
                                  wait_routable)


class StuckDraft(model_pb2_grpc.DraftModelServicer):
    """A draft whose engine is stuck: GetInfo answers, Propose streams are
    accepted and their rounds never answered until ``release`` is set; then
    each round gets gamma proposals of token 1 and ``steps_total`` advances."""

    def __init__(self, tokenizer_hash: str) -> None:
        self.info = model_pb2.ModelInfo(role=stats_pb2.ROLE_DRAFT, model_name="stuck", tokenizer_hash=tokenizer_hash)
        self.release = asyncio.Event()
        #: The request id of each stream opened, probes excluded.
        self.streams: list[str] = []
        self.answered = 0

    async def GetInfo(self, request, context):
        return self.info

    async def Propose(self, request_iterator, context):
        async for msg in request_iterator:
            if msg.request_id and not msg.request_id.startswith("probe:"):
                self.streams.append(msg.request_id)
            await self.release.wait()
            self.answered += 1
            yield model_pb2.ProposeResponse(tokens=[1] * msg.gamma)

    def report(self) -> stats_pb2.LoadReport:
        return stats_pb2.LoadReport(role=stats_pb2.ROLE_DRAFT, timestamp=time.time(), steps_total=self.answered)


@contextlib.asynccontextmanager
async def stuck_draft(tokenizer_hash: str):
    servicer = StuckDraft(tokenizer_hash)
    server, port, health = new_server(BaseConfig(port=0), [SERVICE_NAMES["draft"], SERVICE_NAMES["stats"]],
                                      TracerProvider())
    model_pb2_grpc.add_DraftModelServicer_to_server(servicer, server)
    stats_pb2_grpc.add_StatsServicer_to_server(StatsServicer(servicer.report, 0.1), server)
    await server.start()
    await health.set(True)
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        servicer.release.set()
        await server.stop(0)


def speculative(prompt, n, draft=None):
    req = request(prompt, max_new_tokens=n)
    req.speculation.enabled = True
    if draft is not None:
        req.draft_address = draft
    return req


async def test_a_silent_draft_stops_the_request_and_the_link_until_it_answers(tiny_models, reference_model):
    target = await start_target(tiny_models, draft_timeout_ms=100.0, speculation_min_acceptance=0.0,
                                speculative_disable_by_batch_size=64)
    try:
        async with stuck_draft(target.loaded.tokenizer_hash) as (draft, address):
            prompt = [5, 6, 7]
            expected = hf_greedy(reference_model, prompt, 20)
            tokens, chunks = await collect_direct(target, speculative(prompt, 20, address))
            spec = chunks[-1].speculation
            assert tokens == expected
            # Two deadlines, not one per token (it used to wait out all 19 rounds); then
            # the request proposes by n-gram lookup on the target (services.speculative.fallback).
            assert spec.draft_timeouts == MAX_CONSECUTIVE_TIMEOUTS == 2
            assert "draft unresponsive: 2 rounds in a row" in spec.fallback_reason
            assert spec.method == gen.SPECULATION_METHOD_NGRAM
            link = target.servicer.proposers.link(address)
            await eventually(lambda: link.unresponsive, what="the draft's address to be marked")
            opened = len(draft.streams)

            # The next request does not wait at all: no stream, no round, no timeout.
            tokens, chunks = await collect_direct(target, speculative(prompt, 20, address))
            spec = chunks[-1].speculation
            assert tokens == expected and spec.draft_timeouts == 0
            assert f"draft {address} is unresponsive" in spec.fallback_reason and len(draft.streams) == opened

            # Once it answers (the probe's round, or a late one), the link speculates again.
            draft.release.set()
            await eventually(lambda: not link.unresponsive, what="the draft to answer a probe")
            tokens, chunks = await collect_direct(target, speculative(prompt, 20, address))
            assert tokens == expected and chunks[-1].speculation.rounds > 0
            assert chunks[-1].speculation.draft_timeouts == 0
            assert chunks[-1].speculation.method == gen.SPECULATION_METHOD_DRAFT_MODEL
    finally:
        await target.stop(0)


async def test_marking_a_draft_fails_the_rounds_waiting_on_it_and_refuses_new_ones(tiny_models):
    """The proposer client alone: rounds already waiting on the silent draft
    fail at once when it is marked (rather than each waiting out its own
    deadlines), new proposers fail at once without opening a stream, and
    the probe's answer clears the mark."""
    from services.speculative.remote import ProposerClient
    from services.speculative.sync import Round

    client = ProposerClient()
    results: list[asyncio.Future] = []

    def ask(proposer) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        proposer.propose(Round(discard=0, append=[1, 2, 3], gamma=2),
                         lambda proposal, error: loop.call_soon_threadsafe(done.set_result, (proposal, error)))
        results.append(done)
        return done

    async with stuck_draft("") as (draft, address):
        waiting = ask(client.proposer(address, "r1", gen_sampling(), 384))
        await eventually(lambda: draft.streams == ["r1"], what="the round to reach the draft")
        client.link(address).mark("2 rounds in a row passed their deadline")
        proposal, error = await waiting
        assert proposal is None and f"draft {address} is unresponsive" in str(error)
        proposal, error = await ask(client.proposer(address, "r2", gen_sampling(), 384))
        assert proposal is None and "not waiting for it" in str(error) and draft.streams == ["r1"]
        draft.release.set()
        await eventually(lambda: not client.link(address).unresponsive, what="the probe to be answered")
        proposal, error = await ask(client.proposer(address, "r3", gen_sampling(), 384))
        assert error is None and proposal.tokens == [1, 1]
    await client.close()


async def test_every_round_asked_of_a_cut_stream_is_answered(tiny_models):
    """The engine counts the rounds a draft still computes (a step beside them is not a plain one): a
    round queued behind the one the stream waits for, and one asked after the stream ended, are
    answered with Unavailable, not left without an answer."""
    from services.speculative.remote import ProposerClient
    from services.speculative.sync import Round

    client = ProposerClient()
    loop = asyncio.get_running_loop()

    def ask(proposer) -> asyncio.Future:
        done = loop.create_future()
        proposer.propose(Round(discard=0, append=[1, 2, 3], gamma=2),
                         lambda proposal, error: loop.call_soon_threadsafe(done.set_result, (proposal, error)))
        return done

    async with stuck_draft("") as (draft, address):
        proposer = client.proposer(address, "r1", gen_sampling(), 384)
        first, queued = ask(proposer), ask(proposer)
        await eventually(lambda: draft.streams == ["r1"], what="the first round to reach the draft")
        client.link(address).mark("2 rounds in a row passed their deadline")
        for waiting in (first, queued):
            proposal, error = await asyncio.wait_for(waiting, 5)
            assert proposal is None and f"draft {address} is unresponsive" in str(error)
        proposal, error = await asyncio.wait_for(ask(proposer), 5)  # the stream is over: answered at once
        assert proposal is None and "unresponsive" in str(error)
        draft.release.set()
    await client.close()


def gen_sampling():
    from services.common.stubs import generation_pb2

    return generation_pb2.SamplingParams(temperature=0.0)


async def collect_direct(target, req):
    async with grpc.aio.insecure_channel(target.address) as channel:
        chunks = [c async for c in model_pb2_grpc.TargetModelStub(channel).Generate(req)]
    return [t for c in chunks for t in c.token_ids], chunks


async def test_the_router_stops_choosing_a_silent_draft_until_it_steps_again(tiny_models, reference_model):
    target = await start_target(tiny_models, draft_timeout_ms=100.0, speculation_min_acceptance=0.0,
                                speculative_disable_by_batch_size=64)
    proxy = FakeTarget(upstream=target.address)
    try:
        async with stuck_draft(target.loaded.tokenizer_hash) as (draft, address), \
                fake_target(proxy) as (_, proxied), running_router([proxied], drafts=[address]) as (app, stub, _):
            await wait_routable(stub, [proxied, address])
            prompt = [9, 8, 7]
            expected = hf_greedy(reference_model, prompt, 16)
            tokens, chunks = await collect(stub, speculative(prompt, 16))
            assert tokens == expected and proxy.requests[-1].draft_address == address
            assert chunks[-1].speculation.draft_timeouts == DRAFT_STALL_TIMEOUTS
            status = await listed(stub, address)
            assert status.state == router_pb2.INSTANCE_STATE_EJECTED
            assert "stalled (2 draft rounds timed out" in app.upstreams.registry.get(address).describe(0.0, 1e9)

            tokens, chunks = await collect(stub, speculative(prompt, 16))
            assert tokens == expected and proxy.requests[-1].draft_address == ""  # not chosen
            assert chunks[-1].speculation.draft_timeouts == 0

            # It steps again (the target's probe is answered): back in rotation.
            draft.release.set()
            await wait_routable(stub, [address])
            tokens, chunks = await collect(stub, speculative(prompt, 16))
            assert tokens == expected and proxy.requests[-1].draft_address == address
            assert chunks[-1].speculation.rounds > 0
    finally:
        await target.stop(0)


async def listed(stub, instance_id):
    reply = await stub.ListInstances(router_pb2.ListInstancesRequest())
    return next(i for i in reply.instances if i.spec.id == instance_id)


# -- the decisions, pure ---------------------------------------------------------
def test_draft_verdict_from_a_requests_speculation_stats():
    assert draft_verdict(rounds=0, draft_timeouts=DRAFT_STALL_TIMEOUTS) is DraftVerdict.STALLED
    assert draft_verdict(rounds=7, draft_timeouts=DRAFT_STALL_TIMEOUTS) is DraftVerdict.STALLED
    assert draft_verdict(rounds=7, draft_timeouts=1) is DraftVerdict.ANSWERED
    assert draft_verdict(rounds=0, draft_timeouts=1) is DraftVerdict.UNKNOWN
    assert draft_verdict(rounds=0, draft_timeouts=0) is DraftVerdict.UNKNOWN
    # Rounds after a fallback to n-gram lookup may not be the draft's: no proof it answered.
    assert draft_verdict(rounds=7, draft_timeouts=1, fell_back=True) is DraftVerdict.UNKNOWN
    assert draft_verdict(rounds=7, draft_timeouts=DRAFT_STALL_TIMEOUTS, fell_back=True) is DraftVerdict.STALLED


def test_a_stalled_draft_is_ejected_until_its_engine_steps_or_its_time_is_up():
    reg = Registry(eject_after_failures=5, eject_for_s=30.0)
    reg.upsert(InstanceSpec("d", "h:1", Role.DRAFT))
    reg.set_health("d", Health.SERVING)
    reg.set_identity("d", ModelIdentity(Role.DRAFT))
    reg.record_load("d", LoadReport(steps_total=40), 0.0)
    inst = reg.get("d")
    assert inst.routable(0.0, 2.0) and inst.identity is Identity.CONFIRMED
    reg.record_stall("d", 1.0, "stalled (2 draft rounds timed out on t)")
    assert inst.state is State.EJECTED and not inst.routable(1.0, 2.0)
    # A report from before the stall surfaced may still show the last steps: not progress yet.
    reg.record_load("d", LoadReport(steps_total=41), 1.1)
    reg.record_load("d", LoadReport(steps_total=41), 1.2)
    assert inst.state is State.EJECTED
    reg.record_load("d", LoadReport(steps_total=42), 1.3)
    assert inst.state is State.ACTIVE and inst.routable(1.3, 2.0) and not inst.stalled
    # Without progress, it comes back half-open when its ejection time is up.
    reg.record_stall("d", 2.0, "stalled again")
    assert reg.readmit(31.0) == [] and reg.readmit(32.0) == [inst] and not inst.stalled
    # With ejection off, a stall is counted but keeps the draft in rotation.
    off = Registry(eject_after_failures=0)
    off.upsert(InstanceSpec("d", "h:1", Role.DRAFT))
    off.record_stall("d", 0.0, "stalled")
    assert off.get("d").state is State.ACTIVE and off.get("d").consecutive_failures == 1
