"""The router scenario's floor (services.bench.passthrough) is a faithful hop:
what a user reads as "the cost of any grpcio hop" must relay the very chunks,
statuses and deadlines the client and the target give, and must start and
stop as a process of its own as the scenario runs it."""

from __future__ import annotations

import sys

import grpc
import pytest

from services.bench.router_scenario import passthrough
from services.common.stubs import model_pb2_grpc, router_pb2_grpc
from tests.router_helpers import FakeTarget, collect, fake_target, request, start_target


async def test_the_passthrough_relays_chunks_statuses_and_the_deadline(tiny_models, tmp_path):
    target = await start_target(tiny_models)
    servicer = FakeTarget(upstream=target.address)  # records the deadline each call arrives with
    try:
        async with fake_target(servicer) as (_, fake), grpc.aio.insecure_channel(target.address) as upstream:
            with passthrough(fake, tmp_path) as proxy:
                async with grpc.aio.insecure_channel(proxy) as channel:
                    proxied, direct = router_pb2_grpc.RouterStub(channel), model_pb2_grpc.TargetModelStub(upstream)
                    req = request([5, 6, 7], max_new_tokens=6)
                    req.request_id = "same"
                    tokens, chunks = await collect(proxied, req, timeout=20)
                    want, want_chunks = await collect(direct, req)
                    assert len(tokens) == 6 and tokens == want
                    assert [c.finish_reason for c in chunks] == [c.finish_reason for c in want_chunks]
                    assert servicer.requests[-1] == req  # the bytes arrived as the client sent them
                    assert 0 < servicer.time_remaining[-1] <= 20  # the client's deadline travelled

                    servicer.fail = grpc.StatusCode.RESOURCE_EXHAUSTED  # the next calls fail at the target
                    with pytest.raises(grpc.aio.AioRpcError) as via:
                        await collect(proxied, req)
                    async with grpc.aio.insecure_channel(fake) as straight_channel:
                        with pytest.raises(grpc.aio.AioRpcError) as straight:
                            await collect(model_pb2_grpc.TargetModelStub(straight_channel), req)
                    assert via.value.code() == straight.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert via.value.details() == straight.value.details()
            assert "passthrough ready" in (tmp_path / "passthrough.log").read_text()
    finally:
        await target.stop(0)


def test_a_passthrough_that_cannot_start_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # a "python" that exits at once
    with pytest.raises(RuntimeError, match="did not start"):
        with passthrough("127.0.0.1:1", tmp_path, timeout_s=10):
            pass
