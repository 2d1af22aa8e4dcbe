"""`llmesh status`: every service, its health and its latest load.

The router's registry (ListInstances) gives each model instance's health,
state, pool and load; router, monitor and scaler are asked for their own
health; the scaler's GetStatus adds each pool's current and desired
instances and why; the monitor's GetThroughput adds fleet figures and its
Analyze the top recommendation. An unreachable service is shown as
UNREACHABLE, never as a traceback; another service at an address (a target
given as ``--router``) is SERVICE_UNKNOWN, and its line says what it is.
Exits 0 when router, monitor and scaler all answer SERVING, 1 otherwise.

Given only ``--router``, the monitor and scaler are looked for where the
suite's plan puts them (:mod:`services.common.suite`): on the router's host,
at their fixed offsets from the router's port (`llmesh up --base-port`);
never at another suite's (the default) addresses. A router port whose
offsets leave the port range is a usage error unless --monitor and
--scaler are given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from services.cli import argtypes
from services.cli.certs import add_client_tls_arguments, client_tls
from services.cli.peer import wrong_service
from services.common.suite import DEFAULT_ADDRESSES, PORT_OFFSETS


def suite_address(router: str, name: str) -> str:
    """Where a suite planned around ``router`` (HOST:PORT, as ``argtypes.address``
    checks it) runs service ``name``: the router's host, the port at its
    offset from the router's. ValueError when that port is past 65535: no
    suite can be there, and another suite's defaults would be the wrong one."""
    host, _, port = router.rpartition(":")
    at = int(port) - PORT_OFFSETS["router"] + PORT_OFFSETS[name]
    if not 0 < at <= 65535:
        raise ValueError(f"--router {router}: a suite's {name} would be at port {at} (router port "
                         f"+ {PORT_OFFSETS[name]}), past 65535; give --{name}")
    return f"{host}:{at}"


def _error(exc, channel, address: str, role: str, timeout: float) -> str:
    """A failed call to ``role`` at ``address`` in one line; a server that is another
    service (UNIMPLEMENTED) says so and what it serves."""
    import grpc

    wrong = (wrong_service(channel, address, role, timeout)
             if exc.code() == grpc.StatusCode.UNIMPLEMENTED else None)
    return wrong or f"{exc.code().name}: {exc.details()}"


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
        # Paged KV cache: blocks in use, prefix-cache hits / queries (tokens, since start), preemptions.
        "kv_usage": round(load.kv_cache_usage, 4), "prefix_cache_hits": load.prefix_cache_hits_total,
        "prefix_cache_queries": load.prefix_cache_queries_total, "preemptions": load.preemptions_total,
        "score": round(inst.score, 4),
        # Why the router sends it nothing right now ("" when it can route to it).
        "problem": inst.problem,
    }


def router_stats(stats) -> dict[str, Any]:
    """The router's own figures (router_pb2.RouterStats) as plain data."""
    return {"cache_hits": stats.cache_hits, "cache_misses": stats.cache_misses,
            "cache_entries": stats.cache_entries, "cache_capacity": stats.cache_capacity,
            "in_flight": stats.in_flight, "rejected_total": stats.rejected_total,
            "pools": [{"pool": p.pool, "in_flight": p.in_flight, "max_in_flight": p.max_in_flight,
                       "rejected_total": p.rejected_total} for p in stats.pools]}


def pool_row(pool) -> dict[str, Any]:
    """One scaler pool (scaler_pb2.PoolStatus) as plain data."""
    from services.common.stubs import scaler_pb2, stats_pb2

    return {
        "pool": pool.pool, "role": _enum(stats_pb2.Role.Name(pool.role), "ROLE_"), "current": pool.current,
        "desired": pool.desired, "starting": pool.starting, "draining": pool.draining, "reason": pool.reason,
        "capacity_tokens_per_second": round(pool.capacity_tokens_per_second, 2),
        "capacity_measured": pool.capacity_measured, "panic": pool.panic,
        "min_instances": pool.policy.min_instances, "max_instances": pool.policy.max_instances,
        # The backend's cap on the pool (the local backend's cores), None where there is none.
        "host_max_instances": (int(pool.figures["host_max_instances"]) if "host_max_instances" in pool.figures
                               else None),
        "managed": [{"id": i.id, "state": _enum(scaler_pb2.ManagedState.Name(i.state), "MANAGED_STATE_"),
                     "backend_ref": i.backend_ref} for i in pool.instances
                    if i.state != scaler_pb2.MANAGED_STATE_EXTERNAL],
    }


def recommendation_row(rec) -> dict[str, Any]:
    """One monitor recommendation (monitor_pb2.Recommendation) as plain data."""
    from services.common.stubs import monitor_pb2

    return {"rule": rec.rule, "severity": _enum(monitor_pb2.Severity.Name(rec.severity), "SEVERITY_"),
            "subject": rec.subject, "bottleneck": rec.bottleneck, "action": rec.action,
            "expected_effect": rec.expected_effect,
            "evidence": {k: round(v, 4) for k, v in sorted(rec.evidence.items())}}


def collect(router: str, monitor: str, scaler: str, timeout: float = 2.0, token: str = "",
            tls=None) -> dict[str, Any]:
    """Asks every service; failures become ``*_error`` strings. ``token``: the
    router's bearer token, if it asks for one; ``tls``: the caller's
    :class:`~services.common.tls.TlsFiles` (None: plaintext)."""
    import grpc
    from google.protobuf import json_format

    from services.common.tls import Channels

    from services.common.healthcheck import check
    from services.common.stubs import (SERVICE_NAMES, monitor_pb2, monitor_pb2_grpc, router_pb2, router_pb2_grpc,
                                       scaler_pb2, scaler_pb2_grpc)

    snapshot: dict[str, Any] = {
        # Asked about the service by name: another llmesh service there is SERVICE_UNKNOWN, not SERVING.
        "services": [{"name": name, "address": addr,
                      "health": check(addr, SERVICE_NAMES[name], timeout=timeout, tls=tls)}
                     for name, addr in (("router", router), ("monitor", monitor), ("scaler", scaler))],
        "instances": [], "throughput": None,
    }
    channels = Channels(tls)
    with channels.open_sync(router) as channel:
        try:
            metadata = [("authorization", f"Bearer {token}")] if token else None
            reply = router_pb2_grpc.RouterStub(channel).ListInstances(router_pb2.ListInstancesRequest(),
                                                                      timeout=timeout, metadata=metadata)
            snapshot["instances"] = [instance_row(i) for i in reply.instances]
            snapshot["policy"] = reply.policy
            snapshot["router_stats"] = router_stats(reply.router)
        except grpc.RpcError as exc:
            snapshot["instances_error"] = _error(exc, channel, router, "router", timeout)
    with channels.open_sync(monitor) as channel:
        try:
            reply = monitor_pb2_grpc.MonitorStub(channel).GetThroughput(
                monitor_pb2.GetThroughputRequest(window_s=10.0), timeout=timeout)
            snapshot["throughput"] = json_format.MessageToDict(reply.metrics, preserving_proto_field_name=True,
                                                               always_print_fields_with_no_presence=True)
        except grpc.RpcError as exc:
            snapshot["throughput_error"] = _error(exc, channel, monitor, "monitor", timeout)
        try:
            reply = monitor_pb2_grpc.MonitorStub(channel).Analyze(monitor_pb2.AnalyzeRequest(window_s=10.0),
                                                                  timeout=timeout)
            recs = list(reply.recommendations)
            snapshot["recommendation"] = recommendation_row(recs[0]) if recs else None
            snapshot["recommendations"] = len(recs)
        except grpc.RpcError as exc:
            snapshot["recommendation_error"] = _error(exc, channel, monitor, "monitor", timeout)
    with channels.open_sync(scaler) as channel:
        try:
            reply = scaler_pb2_grpc.ScalerStub(channel).GetStatus(scaler_pb2.GetStatusRequest(), timeout=timeout)
            snapshot["pools"] = [pool_row(p) for p in reply.pools]
            snapshot["backend"] = reply.backend
        except grpc.RpcError as exc:
            snapshot["pools_error"] = _error(exc, channel, scaler, "scaler", timeout)
    return snapshot


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _hit_rate(row: dict[str, Any]) -> str:
    """Prefix-cache hit rate of an instance row ("-" before any lookup)."""
    queries = row.get("prefix_cache_queries", 0)
    return f"{row.get('prefix_cache_hits', 0) / queries:.0%}" if queries else "-"


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
        rows = snapshot["instances"]
        scored = all("score" in i for i in rows)  # the routing policy's score, when the router gave it
        lines += _table([["INSTANCE", "ROLE", "ADDRESS", "HEALTH", "STATE", "POOL", "QUEUE", "RUNNING", "TOK/S",
                          "UTIL", "KV", "HIT", "PREEMPT"] + (["SCORE"] if scored else [])]
                        + [[i["id"], i["role"], i["address"], i["health"], i["state"], i["pool"],
                            str(i["queue"]), str(i["running"]), f"{i['tokens_per_second']:.1f}",
                            f"{i['utilization']:.0%}", f"{i.get('kv_usage', 0.0):.0%}", _hit_rate(i),
                            str(i.get("preemptions", 0))] + ([f"{i['score']:.3f}"] if scored else [])
                           for i in rows])
        lines += [f"  {i['id']} gets no requests: {i['problem']}" for i in rows if i.get("problem")]
    r = snapshot.get("router_stats")
    if r is not None:
        cache = (f"cache {r['cache_hits']} hits / {r['cache_misses']} misses ({r['cache_entries']}/"
                 f"{r['cache_capacity']} answers)" if r["cache_capacity"] else "cache off")
        bounded = ", ".join(f"{p['pool']} {p['in_flight']}/{p['max_in_flight']}" for p in r["pools"]
                            if p["max_in_flight"])
        lines.append(f"router: policy {snapshot.get('policy', '?')} · {r['in_flight']} in flight · "
                     f"{r['rejected_total']} rejected · {cache}" + (f" · pools {bounded}" if bounded else ""))
    lines.append("")
    if "pools_error" in snapshot:
        lines += [f"pools: unknown (scaler: {snapshot['pools_error']})", ""]
    elif "pools" in snapshot:
        lines += _pools(snapshot["pools"], snapshot.get("backend", "")) + [""]
    t = snapshot.get("throughput")
    if t is None:
        lines.append(f"fleet throughput: unknown (monitor: {snapshot.get('throughput_error', 'no answer')})")
    else:
        lines.append(f"fleet over {t['window_s']:.0f} s: {t['requests_per_second']:.2f} req/s · "
                     f"{t['tokens_per_second']:.1f} tokens/s · utilisation {t['accelerator_utilization']:.0%} · "
                     f"queue {t['queue_length']} · {t['in_flight']} in flight · {t['instances']} instance"
                     + ("" if t["instances"] == 1 else "s"))
    if "recommendation_error" in snapshot:
        lines.append(f"top recommendation: unknown (monitor: {snapshot['recommendation_error']})")
    elif "recommendation" in snapshot:
        r = snapshot["recommendation"]
        if r is None:
            lines.append("top recommendation: none (nothing limits the fleet)")
        else:
            more = snapshot.get("recommendations", 1) - 1
            lines.append(f"top recommendation [{r['severity']}] {r['rule']} ({r['subject'] or 'fleet'}): "
                         f"{r['bottleneck']}")
            lines.append(f"  do: {r['action']}")
            hint = f" ({more} more: llmesh status --json)" if more else ""
            lines.append(f"  expect: {r['expected_effect']}{hint}")
    return "\n".join(lines)


def _bounds(p: dict[str, Any]) -> str:
    """A pool's instance bounds, "1-8", with the host's cap where it is lower: "1-8 (host: 1)"."""
    bounds = f"{p['min_instances']}-{p['max_instances']}"
    cap = p.get("host_max_instances")
    return bounds if cap is None or cap >= p["max_instances"] else f"{bounds} (host: {cap})"


def _pools(pools: list[dict[str, Any]], backend: str) -> list[str]:
    if not pools:
        return [f"pools: none (scaler backend {backend})"]
    rows = [["POOL", "ROLE", "CURRENT", "DESIRED", "STARTING", "DRAINING", "BOUNDS", "CAPACITY"]]
    for p in pools:
        cap = p["capacity_tokens_per_second"]
        capacity = (f"{cap:.1f} tok/s ({'measured' if p['capacity_measured'] else 'estimate'})" if cap else "unknown")
        rows.append([p["pool"], p["role"], str(p["current"]), str(p["desired"]), str(p["starting"]),
                     str(p["draining"]), _bounds(p), capacity])
    lines = _table(rows)
    for p in pools:
        if p["role"] != "target":
            continue
        lines.append(f"  {p['pool']}: {'PANIC · ' if p['panic'] else ''}{p['reason']}")
        if p["managed"]:
            lines.append(f"  {p['pool']}: started by the {backend} scaler: " + ", ".join(
                f"{m['id']} {m['state']}" + (f" ({m['backend_ref']})" if m["backend_ref"] else "")
                for m in p["managed"]))
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        tls = client_tls(args)
    except ValueError as exc:
        print(f"llmesh status: {exc}", file=sys.stderr)
        return 2
    try:
        monitor = args.monitor or suite_address(args.router, "monitor")
        scaler = args.scaler or suite_address(args.router, "scaler")
    except ValueError as exc:
        args.parser.error(str(exc))
    snapshot = collect(args.router, monitor, scaler, args.timeout, args.auth_token, tls)
    print(json.dumps(snapshot, indent=2) if args.json else render(snapshot))
    return 0 if all(s["health"] == "SERVING" for s in snapshot["services"]) else 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("status", help="show every service's health and load",
                              description="Shows router, monitor and scaler health, every model instance "
                                          "the router knows with its load, every pool's current and desired "
                                          "instances, the fleet's throughput and the monitor's top "
                                          "recommendation.")
    p.add_argument("--router", type=argtypes.address, metavar="HOST:PORT", default=DEFAULT_ADDRESSES["router"],
                   help="router address (default: %(default)s)")
    p.add_argument("--monitor", type=argtypes.address, metavar="HOST:PORT", default=None,
                   help=f"monitor address (default: the router's host, its port + {PORT_OFFSETS['monitor']}, "
                        f"as `llmesh up` places it: {DEFAULT_ADDRESSES['monitor']} with the default router)")
    p.add_argument("--scaler", type=argtypes.address, metavar="HOST:PORT", default=None,
                   help=f"scaler address (default: the router's host, its port + {PORT_OFFSETS['scaler']}: "
                        f"{DEFAULT_ADDRESSES['scaler']} with the default router)")
    p.add_argument("--timeout", type=argtypes.seconds, default=2.0, help="seconds to wait for each answer (default: %(default)s)")
    p.add_argument("--auth-token", default=os.environ.get("LLMESH_ROUTER_AUTH_TOKEN", ""),
                   help="the router's bearer token, if it requires one (default: $LLMESH_ROUTER_AUTH_TOKEN)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_client_tls_arguments(p)
    p.set_defaults(func=run)
    return p
