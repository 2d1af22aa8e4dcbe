"""The router scenario's floor (services.bench.passthrough) is a faithful hop:
what a user reads as "the cost of any grpcio hop" must relay the very chunks
and statuses the target gives."""

from __future__ import annotations

import grpc
import pytest

from services.bench import passthrough
from services.common.stubs import router_pb2_grpc, model_pb2_grpc
from tests.router_helpers import collect, request, start_target


async def test_the_passthrough_relays_chunks_and_statuses_as_the_target_gives_them(tiny_models):
    target = await start_target(tiny_models)
    try:
        async with grpc.aio.insecure_channel(target.address) as upstream:
            server, port = await passthrough.start(upstream)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    proxied, direct = router_pb2_grpc.RouterStub(channel), model_pb2_grpc.TargetModelStub(upstream)
                    req = request([5, 6, 7], max_new_tokens=6)
                    req.request_id = "same"
                    tokens, chunks = await collect(proxied, req)
                    want, want_chunks = await collect(direct, req)
                    assert len(tokens) == 6 and tokens == want
                    assert [c.finish_reason for c in chunks] == [c.finish_reason for c in want_chunks]

                    bad = request([5, 10 ** 6], max_new_tokens=2)  # a token id outside the vocabulary
                    with pytest.raises(grpc.aio.AioRpcError) as via:
                        await collect(proxied, bad)
                    with pytest.raises(grpc.aio.AioRpcError) as straight:
                        await collect(direct, bad)
                    assert via.value.code() == straight.value.code() == grpc.StatusCode.OUT_OF_RANGE
                    assert via.value.details() == straight.value.details()
                    with pytest.raises(grpc.aio.AioRpcError) as err:  # the client's deadline travels
                        await collect(proxied, request([5, 6], max_new_tokens=200), timeout=0.05)
                    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            finally:
                await server.stop(0)
    finally:
        await target.stop(0)
