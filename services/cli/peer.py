"""What answers at an address the CLI was given, when it is not the service asked for.

A call to the wrong llmesh service (a target's port given as ``--router``)
fails with UNIMPLEMENTED "Method not found!", which names neither the
address nor the mistake. :func:`wrong_service` says both, and what the
server does serve, from its server reflection (every llmesh service has it).
"""

from __future__ import annotations


def served(channel, timeout: float) -> list[str]:
    """The services the server on ``channel`` lists through server reflection
    ([] when it does not answer)."""
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        for reply in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([request]), timeout=timeout):
            return [s.name for s in reply.list_services_response.service]
    except grpc.RpcError:
        pass
    return []


def wrong_service(channel, address: str, role: str, timeout: float = 2.0) -> str | None:
    """``ADDRESS is not a llmesh ROLE (it does not serve NAME; it serves ...)``
    for a call to ``role`` (a SERVICE_NAMES key) answered UNIMPLEMENTED; None
    when the server does list that service (then only a method is missing: an
    older version)."""
    from services.common.stubs import SERVICE_NAMES

    wanted = SERVICE_NAMES[role]
    names = served(channel, timeout)
    if wanted in names:
        return None
    # Health, reflection and Stats: every llmesh service has them, they do not say which it is.
    others = sorted(n for n in names if not n.startswith("grpc.") and n != SERVICE_NAMES["stats"])
    return (f"{address} is not a llmesh {role} (it does not serve {wanted}"
            + (f"; it serves {', '.join(others)})" if others else ")"))
