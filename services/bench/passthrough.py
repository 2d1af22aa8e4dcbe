"""A gRPC hop with no logic: the floor under the router's added latency.

``python -m services.bench.passthrough --port P --target HOST:PORT`` serves
``llmesh.v1.Router/Generate`` and relays each call, as raw bytes, to the
target's ``llmesh.v1.TargetModel/Generate``: no request is parsed, no chunk
decoded, no instance chosen, no span made. ``--scenario router`` puts it
beside the router in the same interleaved run, so that what the router adds
splits into what any grpcio hop costs on this machine (the proxy's added
latency) and the router's own work (router minus proxy, paired call by call).
It is a measuring instrument, not a product path: no TLS, no auth, no health.

Threads: one asyncio event loop (grpc.aio), like the router's.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

from services.common import lifeline

ROUTER_GENERATE = "/llmesh.v1.Router/Generate"
TARGET_GENERATE = "/llmesh.v1.TargetModel/Generate"


def _same(data: bytes) -> bytes:
    return data


class Passthrough(grpc.GenericRpcHandler):
    """Relays Router/Generate to the target's Generate, bytes in, bytes out,
    with the client's deadline; a target's status goes back with its code,
    details and trailing metadata (initial metadata is not relayed)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._generate = channel.unary_stream(TARGET_GENERATE, request_serializer=_same,
                                              response_deserializer=_same)

    def service(self, handler_call_details):
        if handler_call_details.method != ROUTER_GENERATE:
            return None
        return grpc.unary_stream_rpc_method_handler(self._relay, request_deserializer=_same,
                                                    response_serializer=_same)

    async def _relay(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        call = self._generate(request, timeout=context.time_remaining())
        try:
            async for chunk in call:
                await context.write(chunk)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
        finally:
            call.cancel()


async def start(channel: grpc.aio.Channel, port: int = 0, host: str = "127.0.0.1") -> tuple[grpc.aio.Server, int]:
    """A started proxy server relaying to ``channel``'s target, and its port
    (``port`` 0: one the system picks)."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Passthrough(channel),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


async def serve(port: int, target: str, host: str = "127.0.0.1") -> None:
    """Serves until SIGINT/SIGTERM."""
    async with grpc.aio.insecure_channel(target) as channel:
        server, port = await start(channel, port, host)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"passthrough ready on {host}:{port} -> {target}", flush=True)
        await stop.wait()
        await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--target", required=True, help="the target's HOST:PORT")
    args = p.parse_args(argv)
    if not lifeline.bind_to_launcher():
        return 1  # the launcher is gone already
    asyncio.run(serve(args.port, args.target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
