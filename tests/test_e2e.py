"""End to end: `llmesh up` runs the five services as separate processes on
tiny random models; the tests talk to them over real sockets.

One suite serves reflection, exactness through the router and a clean
stop by `llmesh down` (SIGTERM to the launcher); a second one, started with --keep-going, loses its target so
that the router's answer can be timed while the rest keeps running, and serves again once `llmesh up` has
started the target again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest

from services.common.suite import HTTP_OFFSET, MODULES, ports

pytestmark = pytest.mark.e2e

_missing = [m for m in MODULES.values() if importlib.util.find_spec(m) is None]
if _missing:
    pytest.skip(f"service modules not written yet: {', '.join(_missing)}", allow_module_level=True)

from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (  # noqa: E402
    ProtoReflectionDescriptorDatabase,
)

from services.common.stubs import SERVICE_NAMES  # noqa: E402
from services.common.stubs import model_pb2_grpc, router_pb2_grpc  # noqa: E402

from tests.conftest import free_port  # noqa: E402
from tests.e2e_helpers import PROMPT, Suite, alive, greedy, make_home, tokens_of, wait_until_routable  # noqa: E402


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
    # Not the default base port: the suite's logs have a directory of their own (two suites never share files).
    logs = home / "logs" / suite.addresses["router"].rsplit(":", 1)[1]
    assert any(f"logs in {logs}" in line for line in suite.output)
    assert {p.name for p in logs.iterdir()} >= {f"{name}.log" for name in MODULES}


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


def query(prometheus: str, expr: str) -> list:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as reply:
        answer = json.loads(reply.read())
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def test_prometheus_evaluates_every_dashboard_query_over_the_live_suite(suite, tmp_path):
    """Debian's Prometheus scrapes the suite; each panel's query parses and, but for the
    alerts table (empty when nothing fires), returns series."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("LOUD SKIP: no `prometheus` binary (Debian package prometheus): the dashboard's queries "
                    "are checked against the scraped names only")
    port = ports(int(suite.addresses["router"].rsplit(":", 1)[1]))
    targets = [f"127.0.0.1:{port[name]}" for name in ("target-metrics", "draft-metrics", "scaler-metrics",
                                                       "prometheus")]
    (tmp_path / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "llmesh", "honor_labels": True, "static_configs": [{"targets": targets}]}]}))
    web = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address={web}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    prometheus = f"http://{web}"
    try:
        def scraped_at_least(n: int) -> bool:
            try:
                found = query(prometheus, "count(up == 1)")
            except OSError:
                return False
            return bool(found) and int(found[0]["value"][1]) == len(targets) and \
                float(query(prometheus, "min(count_over_time(up[1m]))")[0]["value"][1]) >= n

        wait(lambda: scraped_at_least(1), 30, "Prometheus scraping all four endpoints")
        with grpc.insecure_channel(suite.addresses["router"]) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            for i in range(4):
                tokens_of(router, greedy(speculate=i % 2 == 0))
        seen = float(query(prometheus, "min(count_over_time(up[1m]))")[0]["value"][1])
        wait(lambda: scraped_at_least(seen + 2), 30, "two more scrapes")
        dashboard = json.loads((Path(__file__).resolve().parents[1] / "docker" / "grafana" / "llmesh.json")
                               .read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                result = query(prometheus, target["expr"].replace("$__rate_interval", "1m"))
                assert result or panel["title"] == "Firing alerts", (panel["title"], target["expr"])
        p95 = query(prometheus, "histogram_quantile(0.95, sum by (le) (rate("
                                "llmesh:time_to_first_token_seconds_bucket{role=\"target\"}[1m])))")
        assert 0 < float(p95[0]["value"][1]) < 60
    finally:
        proc.terminate()
        proc.wait(30)


def wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)  # sleep-ok: bounded poll of another process's state
def test_the_openai_http_api_serves_what_router_complete_does(suite):
    """`llmesh up` serves the OpenAI API on the router's HTTP port (base + 32)."""
    port = int(suite.addresses["router"].rsplit(":", 1)[1]) + HTTP_OFFSET
    with grpc.insecure_channel(suite.addresses["router"]) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        wait_until_routable(router)
        reply = router.Complete(greedy(), timeout=60)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
    out = client.completions.create(model="target", prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 12 and out.choices[0].text == reply.text


def test_llmesh_down_stops_all_five_cleanly(suite, home):
    """`llmesh down` from another shell finds the running `llmesh up` through its record
    and stops it as SIGTERM (Ctrl-C) would: every service exits, the record goes."""
    record = json.loads((home / "run" / f"up-{suite.addresses['router'].rsplit(':', 1)[1]}.json").read_text())
    assert record["pid"] == suite.proc.pid and record["services"] == suite.pids
    down = subprocess.run([sys.executable, "-m", "services.cli.main", "down", "--home", str(home)],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=90)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped the suite at" in down.stdout
    assert suite.proc.wait(30) == 0
    suite.wait_for("llmesh up: stopped", 5)
    assert [name for name, pid in suite.pids.items() if alive(pid)] == []
    assert not list((home / "run").glob("up-*.json"))


def test_the_router_answers_unavailable_within_a_second_of_losing_its_only_target_which_comes_back(home):
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
        # llmesh up starts it again, and the router routes to it once it serves.
        suite.wait_for("target started again", 10)
        deadline = time.monotonic() + 60
        while True:
            try:
                with grpc.insecure_channel(suite.addresses["router"]) as channel:
                    assert len(tokens_of(router_pb2_grpc.RouterStub(channel), greedy(4), timeout=5.0)) == 4
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
                time.sleep(0.2)  # sleep-ok: bounded poll while the restarted target loads
        assert suite.terminate() == 1  # a service died: not a clean run
        assert [name for name, pid in suite.pids.items() if alive(pid)] == []
    finally:
        suite.cleanup()
