"""End to end: `llmesh up` runs the five services as separate processes on
tiny random models; the tests talk to them over real sockets.

One suite serves reflection, exactness through the router and a clean
SIGTERM stop; a second one, started with --keep-going, loses its target so
that the router's answer can be timed while the rest keeps running.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from services.common.suite import MODULES, ports

pytestmark = pytest.mark.e2e

_missing = [m for m in MODULES.values() if importlib.util.find_spec(m) is None]
if _missing:
    pytest.skip(f"service modules not written yet: {', '.join(_missing)}", allow_module_level=True)

from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (  # noqa: E402
    ProtoReflectionDescriptorDatabase,
)

from services.common.stubs import SERVICE_NAMES  # noqa: E402
from services.common.stubs import model_pb2_grpc, router_pb2_grpc  # noqa: E402

from tests.e2e_helpers import Suite, alive, greedy, make_home, tokens_of, wait_until_routable  # noqa: E402


@pytest.fixture(scope="module")
def home(tiny_models, tmp_path_factory) -> Path:
    return make_home(tiny_models, tmp_path_factory)


@pytest.fixture(scope="module")
def suite(home):
    suite = Suite.start(home)
    yield suite
    suite.cleanup()


def test_the_launcher_prints_every_service_with_its_address_and_pid(suite, home):
    assert set(suite.pids) == set(MODULES)
    assert all(alive(pid) for pid in suite.pids.values())
    assert any(str(home / "logs") in line for line in suite.output)
    assert {p.name for p in (home / "logs").iterdir()} >= {f"{name}.log" for name in MODULES}


def test_reflection_lists_each_services_llmesh_api(suite):
    for name, address in suite.addresses.items():
        with grpc.insecure_channel(address) as channel:
            listed = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert SERVICE_NAMES[name] in listed, (name, listed)
        assert "grpc.health.v1.Health" in listed


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "speculative"])
def test_greedy_through_the_router_equals_the_target_directly(suite, speculate):
    with grpc.insecure_channel(suite.addresses["target"]) as channel:
        direct = tokens_of(model_pb2_grpc.TargetModelStub(channel), greedy(speculate=False))
    with grpc.insecure_channel(suite.addresses["router"]) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        wait_until_routable(router)
        routed = tokens_of(router, greedy(speculate=speculate))
    assert len(direct) == 12
    assert routed == direct


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its functions, labels or keywords)."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    return {m.group() for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)
            if m.group() not in PROMQL_WORDS and not expr[m.end():].lstrip().startswith("(")}


def scrape(port: int) -> dict[str, list]:
    """Every family and sample name of one /metrics endpoint, with the samples."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, [])
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_every_dashboard_query_reads_metrics_the_live_suite_exports(suite):
    n = 4
    with grpc.insecure_channel(suite.addresses["router"]) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        wait_until_routable(router)
        for i in range(n):
            assert len(tokens_of(router, greedy(speculate=i % 2 == 0))) == 12
    port = ports(int(suite.addresses["router"].rsplit(":", 1)[1]))
    scraped = {name: scrape(port[name]) for name in ("target-metrics", "draft-metrics", "scaler-metrics",
                                                    "prometheus")}
    exported = {name for found in scraped.values() for name in found}
    dashboard = json.loads((Path(__file__).resolve().parents[1] / "docker" / "grafana" / "llmesh.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, (panel["title"], target["expr"])
            assert names <= exported, (panel["title"], names - exported)
    # The histograms hold the requests themselves: one TTFT per request (the test's, and any
    # other request this suite served before), accepted tokens per position add up.
    target = scraped["target-metrics"]
    assert target["llmesh:time_to_first_token_seconds_count"][0].value >= n
    assert target["llmesh:inter_token_latency_seconds_count"][0].value >= n * 11
    assert target["llmesh:generation_tokens_total"][0].value >= n * 12
    accepted = target["llmesh:spec_decode_num_accepted_tokens_total"][0].value
    assert sum(s.value for s in target.get("llmesh:spec_decode_num_accepted_tokens_per_pos_total", [])) == accepted
    assert target["llmesh:spec_decode_num_drafts_total"][0].value > 0
    assert {s.labels["role"] for s in target["llmesh:num_requests_running"]} == {"target"}
    assert scraped["draft-metrics"]["llmesh:num_requests_running"][0].labels["role"] == "draft"


def test_sigterm_stops_all_five_cleanly(suite):
    assert suite.terminate() == 0
    assert [name for name, pid in suite.pids.items() if alive(pid)] == []


def test_the_router_answers_unavailable_within_a_second_of_losing_its_only_target(home):
    suite = Suite.start(home, "--keep-going")
    try:
        with grpc.insecure_channel(suite.addresses["router"]) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            wait_until_routable(router)
            assert len(tokens_of(router, greedy(4))) == 4
            os.kill(suite.pids["target"], signal.SIGKILL)
            killed_at = time.monotonic()
            while True:
                try:
                    tokens_of(router, greedy(4), timeout=2.0)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        waited = time.monotonic() - killed_at
                        break
                assert time.monotonic() - killed_at < 5.0, "the router never answered UNAVAILABLE"
        assert waited < 1.0
        suite.wait_for(f"target (pid {suite.pids['target']}) was killed by signal 9", 10)
        assert all(alive(pid) for name, pid in suite.pids.items() if name != "target")
        assert suite.terminate() == 1  # a service died: not a clean run
        assert [name for name, pid in suite.pids.items() if alive(pid)] == []
    finally:
        suite.cleanup()
