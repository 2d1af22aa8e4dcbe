"""The vLLM-style ``llmesh:`` metrics of a model service and the scaler's gauges, as exposition text."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scaler.metrics import ScalerMetrics
from scaler.policy import Policy
from scaler.state import PoolView
from services.common.load import Role
from services.common.metrics import WindowedMetrics
from services.engine.load import EngineLoad
from services.serving.prometheus_metrics import ServingMetrics


def samples(registry) -> dict[tuple[str, frozenset], float]:
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found, name: str, **labels) -> float:
    hits = [v for (n, ls), v in found.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def load(queue: int = 0, running: int = 0, used: int = 0, capacity: int = 100, queries: int = 0, hits: int = 0,
         preemptions: int = 0) -> EngineLoad:
    return EngineLoad(queue, running, 0, 8, used, capacity, WindowedMetrics().snapshot(1.0),
                      used / capacity if capacity else 0.0, queries, hits, preemptions)


def test_each_finished_request_is_one_observation_in_each_histogram_with_vllms_labels():
    m = ServingMetrics("tiny", "target@1", "target", load)
    m.first_token(0.05)  # observed at the first token, whenever the request ends
    m.finished(tpot_s=0.002, e2e_s=0.3, queue_s=0.0, prompt_tokens=5, generation_tokens=12, reason="length")
    m.finished(tpot_s=None, e2e_s=0.01, queue_s=0.01, prompt_tokens=7, generation_tokens=0, reason="cancelled")
    m.first_token(0.5)
    m.finished(tpot_s=None, e2e_s=0.6, queue_s=0.2, prompt_tokens=3, generation_tokens=1, reason="error")
    found = samples(m.registry)
    labels = {"model_name": "tiny", "instance": "target@1", "role": "target"}
    assert value(found, "llmesh:time_to_first_token_seconds_count", **labels) == 2
    assert value(found, "llmesh:time_to_first_token_seconds_bucket", le="0.04") == 0
    assert value(found, "llmesh:time_to_first_token_seconds_bucket", le="0.06") == 1
    assert value(found, "llmesh:e2e_request_latency_seconds_count") == 3
    assert value(found, "llmesh:request_queue_time_seconds_sum") == 0.21000000000000002
    assert value(found, "llmesh:request_time_per_output_token_seconds_count") == 1
    assert value(found, "llmesh:prompt_tokens_total") == 15
    assert value(found, "llmesh:request_success_total", finished_reason="length") == 1
    assert value(found, "llmesh:request_success_total", finished_reason="cancelled") == 1
    assert not [k for k in found if k[0] == "llmesh:request_success_total" and ("finished_reason", "error") in k[1]]


def test_accepted_tokens_are_counted_per_draft_position_as_a_prefix():
    m = ServingMetrics("tiny", "t", "target", load)
    m.speculation_round(4, 2)
    m.speculation_round(4, 0)
    m.speculation_round(3, 3)
    m.speculation_round(0, 0)  # no draft: not a round
    m.tokens(9)
    m.inter_token(0.003)
    found = samples(m.registry)
    assert value(found, "llmesh:spec_decode_num_drafts_total") == 3
    assert value(found, "llmesh:spec_decode_num_draft_tokens_total") == 11
    assert value(found, "llmesh:spec_decode_num_accepted_tokens_total") == 5
    per_pos = {dict(ls)["position"]: v for (n, ls), v in found.items()
               if n == "llmesh:spec_decode_num_accepted_tokens_per_pos_total"}
    assert per_pos == {"0": 2, "1": 2, "2": 1}
    assert sum(per_pos.values()) == 5
    assert value(found, "llmesh:generation_tokens_total") == 9
    assert value(found, "llmesh:inter_token_latency_seconds_bucket", le="0.0025") == 0
    assert value(found, "llmesh:inter_token_latency_seconds_bucket", le="0.005") == 1


def test_a_target_exports_every_draft_position_from_the_start():
    found = samples(ServingMetrics("tiny", "t", "target", load, draft_positions=3).registry)
    per_pos = {dict(ls)["position"]: v for (n, ls), v in found.items()
               if n == "llmesh:spec_decode_num_accepted_tokens_per_pos_total"}
    assert per_pos == {"0": 0, "1": 0, "2": 0}


def test_gauges_are_read_from_the_engines_last_published_load_at_each_scrape():
    current = [load(queue=3, running=2, used=25, capacity=100, queries=640, hits=480, preemptions=2)]
    m = ServingMetrics("tiny", "t", "target", lambda: current[0])
    found = samples(m.registry)
    assert value(found, "llmesh:num_requests_waiting") == 3
    assert value(found, "llmesh:num_requests_running") == 2
    assert value(found, "llmesh:kv_cache_usage_perc") == 0.25
    assert value(found, "llmesh:prefix_cache_queries_total") == 640
    assert value(found, "llmesh:prefix_cache_hits_total") == 480
    assert value(found, "llmesh:num_preemptions_total") == 2
    current[0] = load(capacity=0)
    found = samples(m.registry)
    assert value(found, "llmesh:num_requests_waiting") == 0 and value(found, "llmesh:kv_cache_usage_perc") == 0


def test_the_scaler_exports_its_last_published_pools():
    m = ScalerMetrics()
    assert not [k for k in samples(m.registry) if k[0].startswith("llmesh:scaler")]
    m.publish([PoolView("default", Role.TARGET, 3, 1, "scale up", Policy(), (), 2, 0),
               PoolView("batch", Role.TARGET, 1, 1, "steady", Policy(), (), 0, 1)])
    found = samples(m.registry)
    assert value(found, "llmesh:scaler_instances", pool="default", role="target") == 1
    assert value(found, "llmesh:scaler_desired_instances", pool="default") == 3
    assert value(found, "llmesh:scaler_starting_instances", pool="default") == 2
    assert value(found, "llmesh:scaler_draining_instances", pool="batch") == 1


def test_the_endpoint_keeps_the_colons_whatever_format_prometheus_asks_for():
    import urllib.request

    from services.common.exposition import MetricsEndpoint

    m = ServingMetrics("tiny", "t", "target", load)
    m.tokens(3)
    endpoint = MetricsEndpoint(m.registry)
    endpoint.start("127.0.0.1", 0)
    try:
        # Prometheus 2.x's Accept header: OpenMetrics 1.0.0 first, with no escaping parameter.
        accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                  "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
        request = urllib.request.Request(f"http://127.0.0.1:{endpoint.port}/metrics", headers={"Accept": accept})
        with urllib.request.urlopen(request, timeout=10) as reply:
            text = reply.read().decode()
        assert 'llmesh:generation_tokens_total{instance="t",model_name="tiny",role="target"} 3.0' in text
        assert "llmesh_generation_tokens" not in text
    finally:
        endpoint.stop()


def test_requests_that_fell_back_to_ngram_are_counted_by_cause():
    from services.speculative.state import SpecStats

    m = ServingMetrics("tiny", "t", "target", load)
    for stats in (SpecStats(fallback="no_draft"), SpecStats(fallback="low_acceptance"),
                  SpecStats(fallback="low_acceptance"), SpecStats(), None):
        m.finished(tpot_s=0.01, e2e_s=0.2, queue_s=0.0, prompt_tokens=3, generation_tokens=4,
                   reason="length", speculation=stats)
    found = samples(m.registry)
    assert value(found, "llmesh:spec_decode_num_fallbacks_total", cause="low_acceptance") == 2
    assert value(found, "llmesh:spec_decode_num_fallbacks_total", cause="no_draft") == 1
