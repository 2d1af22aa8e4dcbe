"""Sliding-window engine metrics (pure; the servicer encodes a snapshot)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0..100) of ``values`` (0 for none).

    numpy's ``inverted_cdf`` method (Hyndman & Fan definition 1): the smallest
    value whose empirical CDF is at least q/100, always one of the values.
    p50 of [26, 195] is 26; p90 of 1..10 is 9; p95 of 1..20 is 19.
    """
    if not len(values):
        return 0.0
    return float(np.percentile(values, q, method="inverted_cdf"))


def ttft_tpot(arrival: float, first_token: float | None, last_token: float | None,
              new_tokens: int) -> tuple[float | None, float | None]:
    """A request's time to first token and mean time per output token after
    the first, in the unit of its timestamps (seconds of one clock).

    ``new_tokens`` counts the tokens generated for this request (resumed ones
    excluded). TTFT is None without a first token; TPOT is None for fewer
    than two tokens. The one definition every service uses.
    """
    ttft = first_token - arrival if first_token is not None else None
    if first_token is None or last_token is None or new_tokens < 2:
        return ttft, None
    return ttft, (last_token - first_token) / (new_tokens - 1)


@dataclass(frozen=True, slots=True)
class Latency:
    """Percentiles of a latency in milliseconds over a window (llmesh.v1.LatencySummary)."""

    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    #: Samples behind the figures.
    count: int = 0

    @classmethod
    def of(cls, values: list[float]) -> "Latency":
        """The summary of ``values`` (milliseconds)."""
        if not values:
            return cls()
        p50, p95, p99 = (float(v) for v in np.percentile(values, [50, 95, 99], method="inverted_cdf"))
        return cls(p50, p95, p99, sum(values) / len(values), len(values))


@dataclass
class MetricsSnapshot:
    window_s: float
    mean_batch_size: float
    token_efficiency: float
    busy_fraction: float
    tokens_per_second: float
    requests_per_second: float
    ttft_ms: Latency
    tpot_ms: Latency
    e2e_ms: Latency
    queue_ms: Latency
    acceptance_rate: float
    mean_accepted_length: float
    counters: dict[str, int] = field(default_factory=dict)


class WindowedMetrics:
    """Records steps and finished requests; summarises the last ``window_s``."""

    def __init__(self, window_s: float = 10.0, started_at: float = 0.0) -> None:
        self.window_s = window_s
        self.started_at = started_at
        self._steps: deque[tuple[float, int, int, int, float]] = deque()
        self._requests: deque[tuple[float, float | None, float]] = deque()
        #: (when, seconds from arrival): each request's admission to the batch, recorded as it happens.
        self._admissions: deque[tuple[float, float]] = deque()
        #: (when, seconds from arrival): each request's first token, recorded as it comes, so that TTFT
        #: shows while long generations still stream (vLLM records it at the first token too).
        self._first_tokens: deque[tuple[float, float]] = deque()
        self._tokens: deque[tuple[float, int]] = deque()
        self._spec: deque[tuple[float, int, int, int, int]] = deque()
        self.counters = {"requests_total": 0, "tokens_generated_total": 0, "errors_total": 0,
                         "rejected_total": 0, "proposed_tokens_total": 0, "accepted_tokens_total": 0,
                         "speculation_rounds_total": 0, "steps_total": 0}

    def record_step(self, now: float, batch_size: int, useful: int, computed: int, busy_s: float) -> None:
        self._steps.append((now, batch_size, useful, computed, busy_s))
        self.counters["steps_total"] += 1

    def record_tokens(self, now: float, n: int) -> None:
        if n:
            self._tokens.append((now, n))
            self.counters["tokens_generated_total"] += n

    def record_first_token(self, now: float, ttft_s: float) -> None:
        """A request's first token came at ``now``, ``ttft_s`` after it arrived."""
        self._first_tokens.append((now, ttft_s))

    def record_admitted(self, now: float, queue_s: float) -> None:
        """A request left the queue for the batch at ``now``, ``queue_s`` after it arrived."""
        self._admissions.append((now, queue_s))

    def record_request(self, now: float, tpot_s: float | None, e2e_s: float, error: bool = False) -> None:
        """A request ended at ``now`` (its admission and first token were recorded as they happened:
        :meth:`record_admitted`, :meth:`record_first_token`)."""
        self._requests.append((now, tpot_s, e2e_s))
        self.counters["requests_total"] += 1
        if error:
            self.counters["errors_total"] += 1

    def record_rejected(self) -> None:
        self.counters["rejected_total"] += 1

    def record_speculation(self, now: float, rounds: int, proposed: int, accepted: int,
                           emitted: int | None = None) -> None:
        """Verified speculation rounds: ``proposed`` draft tokens, ``accepted``
        of them kept, ``emitted`` tokens the rounds added (default ``accepted +
        rounds``: the target's own token each); counts of emitted tokens only."""
        self._spec.append((now, rounds, proposed, accepted, accepted + rounds if emitted is None else emitted))
        self.counters["speculation_rounds_total"] += rounds
        self.counters["proposed_tokens_total"] += proposed
        self.counters["accepted_tokens_total"] += accepted

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        for q in (self._steps, self._requests, self._tokens, self._spec, self._first_tokens, self._admissions):
            while q and q[0][0] < horizon:
                q.popleft()

    def snapshot(self, now: float) -> MetricsSnapshot:
        self._trim(now)
        span = max(1e-9, min(self.window_s, now - self.started_at))
        steps = list(self._steps)
        reqs = list(self._requests)
        computed = sum(s[3] for s in steps)
        rounds = sum(s[1] for s in self._spec)
        proposed = sum(s[2] for s in self._spec)
        accepted = sum(s[3] for s in self._spec)
        ms = lambda xs: [x * 1000.0 for x in xs if x is not None]  # noqa: E731
        return MetricsSnapshot(
            window_s=span,
            mean_batch_size=sum(s[1] for s in steps) / len(steps) if steps else 0.0,
            token_efficiency=sum(s[2] for s in steps) / computed if computed else 1.0,
            busy_fraction=min(1.0, sum(s[4] for s in steps) / span),
            tokens_per_second=sum(n for _, n in self._tokens) / span,
            requests_per_second=len(reqs) / span,
            ttft_ms=Latency.of(ms(t for _, t in self._first_tokens)),
            tpot_ms=Latency.of(ms(r[1] for r in reqs)),
            e2e_ms=Latency.of(ms(r[2] for r in reqs)),
            queue_ms=Latency.of(ms(q for _, q in self._admissions)),
            acceptance_rate=accepted / proposed if proposed else 0.0,
            mean_accepted_length=sum(s[4] for s in self._spec) / rounds if rounds else 0.0,
            counters=dict(self.counters),
        )
