"""Access to the generated protobuf modules (built by `make protos`)."""

from __future__ import annotations

try:
    from llmesh.v1 import (  # noqa: F401 - re-exported
        generation_pb2,
        model_pb2,
        model_pb2_grpc,
        monitor_pb2,
        monitor_pb2_grpc,
        router_pb2,
        router_pb2_grpc,
        scaler_pb2,
        scaler_pb2_grpc,
        stats_pb2,
        stats_pb2_grpc,
    )
except ImportError as exc:  # pragma: no cover - a set-up error, not a runtime path
    raise ImportError(
        "the generated gRPC stubs are missing: run `make install` (or `make protos`)"
    ) from exc

#: Fully qualified names of every llmesh service, for reflection and health.
SERVICE_NAMES = {
    "router": router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
    "target": model_pb2.DESCRIPTOR.services_by_name["TargetModel"].full_name,
    "draft": model_pb2.DESCRIPTOR.services_by_name["DraftModel"].full_name,
    "monitor": monitor_pb2.DESCRIPTOR.services_by_name["Monitor"].full_name,
    "scaler": scaler_pb2.DESCRIPTOR.services_by_name["Scaler"].full_name,
    "stats": stats_pb2.DESCRIPTOR.services_by_name["Stats"].full_name,
}
