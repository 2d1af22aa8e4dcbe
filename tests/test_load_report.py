"""The base's shared types: the load report checked against stats.proto, and the retry backoff."""

from __future__ import annotations

import dataclasses
import random

import pytest
from google.protobuf.descriptor import FieldDescriptor

from monitor.store import Report
from services.common import load_codec
from services.common.backoff import Backoff
from services.common.load import Latency, LoadReport, Role, UtilizationSource, windowed
from services.common.metrics import WindowedMetrics
from services.common.stubs import monitor_pb2, stats_pb2

_PY_TYPE = {FieldDescriptor.TYPE_STRING: "str", FieldDescriptor.TYPE_DOUBLE: "float",
            FieldDescriptor.TYPE_INT32: "int", FieldDescriptor.TYPE_INT64: "int"}
_ENUMS = {"Role": (Role, "ROLE_"), "UtilizationSource": (UtilizationSource, "UTILIZATION_SOURCE_")}


def _kind(fd: FieldDescriptor) -> str:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return {"LatencySummary": "Latency"}.get(fd.message_type.name, fd.message_type.name)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return fd.enum_type.name
    return _PY_TYPE.get(fd.type, f"unmapped proto type {fd.type}")


@pytest.mark.parametrize("mirror, message", [(LoadReport, stats_pb2.LoadReport), (Latency, stats_pb2.LatencySummary)])
def test_the_python_types_have_the_protos_fields_names_and_kinds(mirror, message):
    proto = [(fd.name, _kind(fd)) for fd in sorted(message.DESCRIPTOR.fields, key=lambda fd: fd.number)]
    python = [(f.name, f.type) for f in dataclasses.fields(mirror)]
    assert python == proto


@pytest.mark.parametrize("name", sorted(_ENUMS))
def test_the_enums_have_the_protos_values(name):
    enum, prefix = _ENUMS[name]
    values = stats_pb2.DESCRIPTOR.enum_types_by_name[name].values
    assert [prefix + member.name for member in enum] == [v.name for v in values]
    assert [member.value for member in enum] == [v.name.removeprefix(prefix).lower() for v in values]


def _every_field_set(message):
    """A message with every field at a distinct value that is not its default."""
    pb = message()
    for k, fd in enumerate(message.DESCRIPTOR.fields, start=1):
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            sub = getattr(pb, fd.name)
            sub.CopyFrom(_filled(type(sub), k))
        elif fd.type == FieldDescriptor.TYPE_ENUM:
            setattr(pb, fd.name, fd.enum_type.values[-1].number)
        elif fd.type == FieldDescriptor.TYPE_STRING:
            setattr(pb, fd.name, f"v{k}")
        else:
            setattr(pb, fd.name, k + (0.5 if fd.type == FieldDescriptor.TYPE_DOUBLE else 0))
    return pb


def _filled(message, seed: int):
    pb = message()
    for k, fd in enumerate(message.DESCRIPTOR.fields, start=1):
        setattr(pb, fd.name, 100 * seed + k + (0.25 if fd.type == FieldDescriptor.TYPE_DOUBLE else 0))
    return pb


def test_every_field_survives_the_round_trip():
    pb = _every_field_set(stats_pb2.LoadReport)
    assert len(pb.ListFields()) == len(stats_pb2.LoadReport.DESCRIPTOR.fields)
    report = load_codec.report_of(pb)
    assert report.role is Role.SCALER and report.utilization_source is UtilizationSource.NVML
    assert report.ttft == Latency(1701.25, 1702.25, 1703.25, 1704.25, 1705)
    assert load_codec.report_pb(report) == pb


def test_unknown_enum_values_read_as_unspecified():
    report = load_codec.report_of(stats_pb2.LoadReport(role=99, utilization_source=42))
    assert (report.role, report.utilization_source) == (Role.UNSPECIFIED, UtilizationSource.UNSPECIFIED)


def test_the_monitors_report_is_the_load_report_and_its_arrival():
    names = [f.name for f in dataclasses.fields(Report)]
    assert names == [f.name for f in dataclasses.fields(LoadReport)] + ["received_at"]
    kept = load_codec.report_of(stats_pb2.LoadReport(instance_id="a", in_flight=3), Report, received_at=7.0)
    assert (kept.instance_id, kept.in_flight, kept.received_at) == ("a", 3, 7.0)
    assert load_codec.report_pb(kept) == stats_pb2.LoadReport(instance_id="a", in_flight=3)


def test_windowed_takes_every_counter_and_lets_the_caller_set_the_rest():
    metrics = WindowedMetrics(window_s=10.0)
    metrics.record_step(1.0, batch_size=2, useful=2, computed=4, busy_s=0.1)
    metrics.record_tokens(1.0, 5)
    metrics.record_admitted(0.75, queue_s=0.05)
    metrics.record_first_token(0.9, ttft_s=0.2)
    metrics.record_request(1.0, tpot_s=0.01, e2e_s=0.3)
    metrics.record_speculation(1.0, rounds=2, proposed=8, accepted=6)
    m = metrics.snapshot(2.0)
    report = windowed(m, instance_id="t", running=2, token_efficiency=0.0)
    assert {k: getattr(report, k) for k in m.counters} == m.counters
    assert (report.instance_id, report.running, report.token_efficiency) == ("t", 2, 0.0)
    assert report.ttft == Latency(200.0, 200.0, 200.0, 200.0, 1) and report.mean_batch_size == 2.0
    with pytest.raises(TypeError):
        windowed(m, no_such_field=1)


def test_ttft_and_queue_time_show_while_requests_still_stream():
    """A request's TTFT counts from its first token, not from its end: under long generations the window
    had no TTFT sample at all while tokens streamed (2026-12-02, 100 streams of 1500 tokens: count 0)."""
    metrics = WindowedMetrics(window_s=5.0)
    for i in range(3):
        metrics.record_first_token(1.0 + i, ttft_s=0.1 * (i + 1))
    m = metrics.snapshot(4.0)
    assert m.ttft_ms.count == 3 and m.ttft_ms.p50_ms == pytest.approx(200.0) and m.e2e_ms.count == 0
    assert metrics.snapshot(20.0).ttft_ms.count == 0  # out of the window
    metrics.record_admitted(21.0, queue_s=0.5)  # queue time likewise at admission
    assert metrics.snapshot(22.0).queue_ms.count == 1 and metrics.snapshot(22.0).e2e_ms.count == 0


def test_backoff_doubles_up_to_its_cap_and_resets():
    b = Backoff(0.5, 3.0)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.reset()
    assert b.next() == 0.5


def test_backoff_with_jitter_stays_between_half_the_cap_and_the_cap():
    b = Backoff(1.0, 8.0, random.Random(7))
    for cap in (1.0, 2.0, 4.0, 8.0, 8.0, 8.0):
        assert cap / 2 <= b.next() <= cap


def test_the_monitors_throughput_has_every_field_of_throughput_metrics():
    from monitor.codec import THROUGHPUT_FIELDS, throughput_pb
    from monitor.metrics import Throughput

    python = {f.name: f.type for f in dataclasses.fields(Throughput)}
    for fd in monitor_pb2.ThroughputMetrics.DESCRIPTOR.fields:
        assert python.get(fd.name) == _kind(fd), fd.name
    assert THROUGHPUT_FIELDS == tuple(fd.name for fd in monitor_pb2.ThroughputMetrics.DESCRIPTOR.fields)
    pb = throughput_pb(Throughput(window_s=10.0, in_flight=3, batch_fill=0.5, ttft=Latency(p95_ms=9.0),
                                  utilization_source=UtilizationSource.NVML, saturation=1.0))
    assert (pb.window_s, pb.in_flight, pb.batch_fill, pb.ttft.p95_ms, pb.saturation) == (10.0, 3, 0.5, 9.0, 1.0)
    assert pb.utilization_source == stats_pb2.UTILIZATION_SOURCE_NVML
