"""`llmesh status`: every service, its health and its latest load.

The router's registry (ListInstances) gives each model instance's health,
state, pool and load; router, monitor and scaler are asked for their own
health; the monitor's GetThroughput adds fleet figures when it answers. An
unreachable service is shown as UNREACHABLE, never as a traceback. Exits 0
when router, monitor and scaler all answer SERVING, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from services.cli.plan import DEFAULT_ADDRESSES


def _error(exc) -> str:
    return f"{exc.code().name}: {exc.details()}"


def _enum(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


def instance_row(inst) -> dict[str, Any]:
    """One registry entry (router_pb2.InstanceStatus) as plain data."""
    from services.common.stubs import router_pb2, stats_pb2

    load = inst.load
    return {
        "id": inst.spec.id or inst.spec.address, "address": inst.spec.address,
        "role": _enum(stats_pb2.Role.Name(inst.spec.role), "ROLE_"), "pool": inst.spec.pool or "default",
        "health": _enum(router_pb2.InstanceHealth.Name(inst.health), "INSTANCE_HEALTH_"),
        "state": _enum(router_pb2.InstanceState.Name(inst.state), "INSTANCE_STATE_"),
        "queue": load.queue_length, "running": load.running, "tokens_per_second": round(load.tokens_per_second, 2),
        "utilization": round(load.accelerator_utilization, 4), "load_age_s": round(inst.load_age_s, 2),
        "score": round(inst.score, 4),
    }


def collect(router: str, monitor: str, scaler: str, timeout: float = 2.0) -> dict[str, Any]:
    """Asks every service; failures become ``*_error`` strings."""
    import grpc
    from google.protobuf import json_format

    from services.cli.healthcheck import check
    from services.common.stubs import monitor_pb2, monitor_pb2_grpc, router_pb2, router_pb2_grpc

    snapshot: dict[str, Any] = {
        "services": [{"name": name, "address": addr, "health": check(addr, timeout=timeout)}
                     for name, addr in (("router", router), ("monitor", monitor), ("scaler", scaler))],
        "instances": [], "throughput": None,
    }
    with grpc.insecure_channel(router) as channel:
        try:
            reply = router_pb2_grpc.RouterStub(channel).ListInstances(router_pb2.ListInstancesRequest(),
                                                                      timeout=timeout)
            snapshot["instances"] = [instance_row(i) for i in reply.instances]
            snapshot["policy"] = reply.policy
        except grpc.RpcError as exc:
            snapshot["instances_error"] = _error(exc)
    with grpc.insecure_channel(monitor) as channel:
        try:
            reply = monitor_pb2_grpc.MonitorStub(channel).GetThroughput(
                monitor_pb2.GetThroughputRequest(window_s=10.0), timeout=timeout)
            snapshot["throughput"] = json_format.MessageToDict(reply.metrics, preserving_proto_field_name=True,
                                                               always_print_fields_with_no_presence=True)
        except grpc.RpcError as exc:
            snapshot["throughput_error"] = _error(exc)
    return snapshot


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def render(snapshot: dict[str, Any]) -> str:
    """The snapshot as text tables (pure)."""
    lines = _table([["SERVICE", "ADDRESS", "HEALTH"]]
                   + [[s["name"], s["address"], s["health"]] for s in snapshot["services"]])
    lines.append("")
    if "instances_error" in snapshot:
        lines.append(f"model instances: unknown (router: {snapshot['instances_error']})")
    elif not snapshot["instances"]:
        lines.append("model instances: none registered")
    else:
        lines += _table([["INSTANCE", "ROLE", "ADDRESS", "HEALTH", "STATE", "POOL", "QUEUE", "RUNNING", "TOK/S",
                          "UTIL"]] + [[i["id"], i["role"], i["address"], i["health"], i["state"], i["pool"],
                                       str(i["queue"]), str(i["running"]), f"{i['tokens_per_second']:.1f}",
                                       f"{i['utilization']:.0%}"] for i in snapshot["instances"]])
    lines.append("")
    t = snapshot.get("throughput")
    if t is None:
        lines.append(f"fleet throughput: unknown (monitor: {snapshot.get('throughput_error', 'no answer')})")
    else:
        lines.append(f"fleet over {t['window_s']:.0f} s: {t['requests_per_second']:.2f} req/s · "
                     f"{t['tokens_per_second']:.1f} tokens/s · utilisation {t['accelerator_utilization']:.0%} · "
                     f"queue {t['queue_length']} · {t['concurrent_users']} in flight · {t['instances']} instances")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    snapshot = collect(args.router, args.monitor, args.scaler, args.timeout)
    print(json.dumps(snapshot, indent=2) if args.json else render(snapshot))
    return 0 if all(s["health"] == "SERVING" for s in snapshot["services"]) else 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("status", help="show every service's health and load",
                              description="Shows router, monitor and scaler health, every model instance "
                                          "the router knows with its load, and the fleet's throughput.")
    p.add_argument("--router", default=DEFAULT_ADDRESSES["router"], help="router address (default: %(default)s)")
    p.add_argument("--monitor", default=DEFAULT_ADDRESSES["monitor"], help="monitor address (default: %(default)s)")
    p.add_argument("--scaler", default=DEFAULT_ADDRESSES["scaler"], help="scaler address (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each answer (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)
    return p
