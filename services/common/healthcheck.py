"""`python -m services.common.healthcheck ADDR [--service NAME] [--timeout S] [--tls-cert ...]`.

Asks ``grpc.health.v1.Health/Check`` at ADDR; exits 0 when the answer is
SERVING and 1 otherwise (NOT_SERVING, unreachable, timeout), printing the
status. Over TLS when given --tls-cert/--tls-key/--tls-ca or, by default,
``LLMESH_TLS_CERT``/``_KEY``/``_CA`` (a container's own certificate, so the
same command works whether its service serves TLS or not). Container
healthchecks run it, so it imports only grpc, the health stubs and
:mod:`services.common.tls`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tls import ENV_CA, ENV_CERT, ENV_KEY, Channels, TlsFiles

#: What :func:`check` returns when there is no answer.
UNREACHABLE = "UNREACHABLE"


def check(address: str, service: str = "", timeout: float = 2.0, tls: TlsFiles | None = None) -> str:
    """The health status name at ``address`` ("SERVING", "NOT_SERVING", ...),
    or :data:`UNREACHABLE` when no answer came within ``timeout`` seconds
    (a TLS handshake that fails included). ``tls``: the caller's certificate
    (None: plaintext)."""
    with Channels(tls).open_sync(address) as channel:
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
    for flag, var in (("--tls-cert", ENV_CERT), ("--tls-key", ENV_KEY), ("--tls-ca", ENV_CA)):
        parser.add_argument(flag, default=os.environ.get(var, ""), help=f"TLS file (PEM) (default: ${var})")
    args = parser.parse_args(argv)
    try:
        tls = TlsFiles.of(args.tls_cert, args.tls_key, args.tls_ca, client_only=True)
    except ValueError as exc:
        parser.error(str(exc))
    status = check(args.address, args.service, args.timeout, tls)
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
