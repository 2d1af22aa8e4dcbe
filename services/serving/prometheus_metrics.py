"""A model service's own Prometheus metrics, under vLLM's names with an ``llmesh:`` prefix.

vLLM (v1 engine, ``vllm/v1/metrics/loggers.py``) exports request histograms,
scheduler gauges and token / speculative-decoding counters as ``vllm:NAME``;
dashboards, KEDA scalers and HPA rules written for it read these names. Each
model service exports the same names and shapes as ``llmesh:NAME`` (so such
a rule needs only its prefix changed), with the labels ``model_name`` (as
vLLM), ``instance`` (the llmesh instance id: scrape with
``honor_labels: true``) and ``role`` (target or draft).

Histograms and counters are fed per observation by the engine thread
(:class:`~services.engine.observer.EngineObserver`); the gauges are read at
scrape time from the engine's last published load. Everything lives on a
registry of the service's own, never the process-global one, so two
instances in one process (tests) do not mix.

vLLM's ``prefix_cache_queries_total`` / ``prefix_cache_hits_total`` (tokens)
and ``num_preemptions_total`` are counters read from the same load (the
engine's block manager counts them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from services.engine.load import EngineLoad
from services.engine.observer import EngineObserver

PREFIX = "llmesh:"
LABELS = ("model_name", "instance", "role")
#: Names kept for the engine's prefix-cache and preemption counters (vLLM's, prefixed).
PREFIX_CACHE_QUERIES = PREFIX + "prefix_cache_queries"
PREFIX_CACHE_HITS = PREFIX + "prefix_cache_hits"
NUM_PREEMPTIONS = PREFIX + "num_preemptions"

# vLLM v1's buckets, with finer ones under 10 ms for CPU-sized models.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _LoadGauges(Collector):
    """vLLM's scheduler gauges from the engine's last published load, read at each scrape."""

    def __init__(self, load: Callable[[], EngineLoad], labels: list[str]) -> None:
        self._load = load
        self._labels = labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        load = self._load()
        figures = (
            ("num_requests_running", "Number of requests in model execution batches.", load.running),
            ("num_requests_waiting", "Number of requests waiting to be processed.", load.queue_length),
            ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             load.kv_usage),
        )
        for name, doc, value in figures:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=LABELS)
            family.add_metric(self._labels, float(value))
            yield family
        counters = (
            (PREFIX_CACHE_QUERIES, "Prefix-cache queries, in tokens.", load.prefix_cache_queries),
            (PREFIX_CACHE_HITS, "Prefix-cache hits, in tokens.", load.prefix_cache_hits),
            (NUM_PREEMPTIONS, "Cumulative number of preemptions from the engine.", load.preemptions),
        )
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc, labels=LABELS)
            family.add_metric(self._labels, float(value))
            yield family


class ServingMetrics(EngineObserver):
    """The ``llmesh:`` metrics of one model-service instance, on :attr:`registry`.

    ``load`` returns the engine's last published :class:`EngineLoad` (any
    thread). ``draft_positions`` (the highest γ) positions of
    ``spec_decode_num_accepted_tokens_per_pos`` are exported from the start,
    at 0, as vLLM does. The observer methods run on the engine thread; collection runs
    on the HTTP server's thread (prometheus-client's metrics are thread-safe).
    """

    def __init__(self, model_name: str, instance: str, role: str, load: Callable[[], EngineLoad],
                 draft_positions: int = 0) -> None:
        self.registry = CollectorRegistry(auto_describe=False)  # the gauges read the load only at scrapes
        values = [model_name, instance, role]
        self.registry.register(_LoadGauges(load, values))

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return Histogram(PREFIX + name, doc, LABELS, buckets=buckets, registry=self.registry).labels(*values)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()):
            metric = Counter(PREFIX + name, doc, LABELS + extra, registry=self.registry)
            return metric if extra else metric.labels(*values)

        self._values = values
        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", REQUEST_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        self.success = counter("request_success", "Count of successfully processed requests.",
                               ("finished_reason",))
        self.drafts = counter("spec_decode_num_drafts", "Number of spec decoding drafts.")
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Number of draft tokens.")
        self.accepted = counter("spec_decode_num_accepted_tokens", "Number of accepted tokens.")
        self.accepted_per_pos = counter("spec_decode_num_accepted_tokens_per_pos",
                                        "Accepted tokens per draft position.", ("position",))
        # llmesh's own (vLLM has no fallback): requests that switched from the draft model to ngram.
        self.fallbacks = counter("spec_decode_num_fallbacks",
                                 "Requests that fell back from the draft model to ngram, by cause.", ("cause",))
        # Labelled children looked up once (a labels() call costs microseconds, on the engine thread).
        self._positions = [self.accepted_per_pos.labels(*values, str(p)) for p in range(draft_positions)]
        self._reasons: dict[str, Counter] = {}
        self._causes: dict[str, Counter] = {}

    # -- EngineObserver (engine thread) -----------------------------------------------
    def tokens(self, generated: int) -> None:
        self.generation_tokens.inc(generated)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def speculation_round(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        self.drafts.inc()
        self.draft_tokens.inc(proposed)
        self.accepted.inc(accepted)
        while len(self._positions) < accepted:
            self._positions.append(self.accepted_per_pos.labels(*self._values, str(len(self._positions))))
        for position in range(accepted):
            self._positions[position].inc()

    def first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def finished(self, *, tpot_s: float | None, e2e_s: float, queue_s: float,
                 prompt_tokens: int, generation_tokens: int, reason: str, speculation=None) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        if cause := getattr(speculation, "fallback", ""):  # SpecStats.fallback: a Fallback value
            if cause not in self._causes:
                self._causes[cause] = self.fallbacks.labels(*self._values, cause)
            self._causes[cause].inc()
        self.e2e.observe(e2e_s)
        self.queue.observe(queue_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)
        if reason != "error":
            if reason not in self._reasons:
                self._reasons[reason] = self.success.labels(*self._values, reason)
            self._reasons[reason].inc()
