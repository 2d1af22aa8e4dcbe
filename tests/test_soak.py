"""The soak scenario's pure parts: memory growth, rest, the request mix."""

from __future__ import annotations

import random

import pytest

from services.bench.soak import KINDS, _request, at_rest, growth, rss_mib
from services.common.stubs import router_pb2, stats_pb2


def test_growth_is_relative_and_a_dead_service_is_infinite():
    g = growth({"target": 400.0, "router": 50.0, "draft": 100.0}, {"target": 410.0, "router": 50.0, "draft": None})
    assert g["target"] == pytest.approx(0.025) and g["router"] == 0.0 and g["draft"] == float("inf")


def _instance(in_flight=0, running=0, queue=0, kv=0, report=True):
    i = router_pb2.InstanceStatus(in_flight=in_flight)
    if report:
        i.load.CopyFrom(stats_pb2.LoadReport(running=running, queue_length=queue, kv_cache_used_tokens=kv))
    return i


@pytest.mark.parametrize("busy", [dict(in_flight=1), dict(running=1), dict(queue=2), dict(kv=16), dict(report=False)])
def test_at_rest_needs_every_figure_at_zero(busy):
    assert at_rest([_instance(), _instance()])
    assert not at_rest([_instance(), _instance(**busy)])
    assert not at_rest([])


def test_request_mix_asks_for_what_each_kind_means():
    rng = random.Random(0)
    prompts = ["one two", "three four"]
    for _ in range(50):
        for kind in KINDS:
            req, deadline, cancel_after = _request(kind, rng, prompts)
            assert 8 <= req.sampling.max_new_tokens <= 64
            assert (deadline is not None) == (kind == "deadline")
            assert (cancel_after > 0) == (kind == "cancel")
            if req.sampling.temperature > 0:
                assert req.sampling.HasField("seed")


def test_rss_of_this_process_and_of_none():
    import os

    assert rss_mib(os.getpid()) > 1
    assert rss_mib(2 ** 30) is None
