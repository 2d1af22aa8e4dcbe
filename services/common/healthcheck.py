"""`python -m services.common.healthcheck ADDR [--service NAME] [--timeout S]`.

Asks ``grpc.health.v1.Health/Check`` at ADDR; exits 0 when the answer is
SERVING and 1 otherwise (NOT_SERVING, unreachable, timeout), printing the
status. Container healthchecks run it, so it imports only grpc and the
health stubs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

#: What :func:`check` returns when there is no answer.
UNREACHABLE = "UNREACHABLE"


def check(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The health status name at ``address`` ("SERVING", "NOT_SERVING", ...),
    or :data:`UNREACHABLE` when no answer came within ``timeout`` seconds."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            return UNREACHABLE
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.healthcheck", description=__doc__.split("\n\n")[1])
    parser.add_argument("address", help="host:port of a gRPC server")
    parser.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    status = check(args.address, args.service, args.timeout)
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
