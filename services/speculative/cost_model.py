"""Speculation that pays: gamma per step from step costs measured as the engine runs.

The idea of SmartSpec (Liu et al. 2024, "Optimizing Speculative Decoding for
Serving Large Language Models Using Goodput") and vLLM's dynamic speculative
decoding: at each step pick the proposal length gamma (0 = no speculation)
that maximises the batch's expected *goodput*, emitted tokens per second::

    goodput(0)     = b / period(b, 0)
    goodput(gamma) = (sum_i [r_m E(alpha_i, gamma) + (1 - r_m - s_m)] + plain) / period(b, gamma)

with ``E(alpha, gamma) = (1 - alpha^(gamma+1)) / (1 - alpha)`` the expected
tokens a round of gamma emits when each proposal is accepted with
probability alpha (Leviathan et al. 2023, eq. 1), ``alpha_i`` each
speculating sequence's measured acceptance; ``r_m`` and ``s_m`` what steps of
gamma at this batch size were measured to find among the speculating
sequences of sequence i's proposal method m (a draft model's are nearly
always in, an n-gram lookup's only where it found something):
``r_m`` the fraction whose proposals were in (verified), ``s_m`` the
fraction that sat the step out, their drafts still working (the batch waits
at most ``draft_hold_ms`` for them; then they wait alone, up to
``draft_timeout_ms``, and emit nothing in that step), the rest decoding one
token without a proposal (none asked: too close to their end, or an n-gram
lookup that found nothing); ``plain`` the rows that do not speculate (one
token each) and ``period(b, gamma)`` the measured wall time
of a step of ``b`` rows that verifies gamma proposals per row: the forward
pass of ``gamma + 1`` tokens per row plus the gap before it (the wait for the
drafts, the engine's own Python), both measured on this machine as it runs.
Nothing machine-specific is a default: an unmeasured cost is taken to be
the cheapest one measured (a forward bound by reading the weights costs
about the same for 1 and 9 tokens per row), and an unmeasured ``r_m`` is 1
(``s_m`` 0), so speculation is tried where it has not been measured and kept
only where it pays, which :meth:`StepCosts.realized` checks: the goodput
speculating steps delivered, tokens as counted, against a plain step's one
token per sequence per period. ``s_m`` matters where the draft is the
bottleneck (many streams on few cores): a sequence that sits a step out
gains nothing in it; ``r_m`` of a lookup, where the text seldom repeats. :func:`choose_gamma` is
the pure decision; :class:`StepCosts` keeps the measurements.

Pure Python; engine thread only; times in seconds of the engine's clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def expected_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens a round of ``gamma`` proposals emits (accepted ones and
    the target's own) when each is accepted with probability ``alpha``
    (Leviathan et al. 2023, eq. 1); 1.0 for gamma 0."""
    alpha = min(max(alpha, 0.0), 1.0)
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


@dataclass(frozen=True)
class Speculating:
    """The speculating sequences of one proposal method in a step: each one's
    acceptance probability (in [0, 1]), and what steps of each gamma were
    measured to find among sequences of this method, as lists indexed by
    gamma: ``ready[g]`` the fraction verified, ``sat_out[g]`` the fraction
    that sat the step out (None: all verified, none out). Methods differ
    there: a draft model's sequences are nearly always verified, an n-gram
    lookup's only where the lookup found something, so one batch-wide
    fraction would charge one method's misses to the other's sequences."""

    acceptance: Sequence[float]
    ready: Sequence[float] | None = None
    sat_out: Sequence[float] | None = None

    def tokens(self, gamma: int) -> float:
        """Expected tokens these sequences emit in a step of ``gamma``: a
        verified one a round's (:func:`expected_tokens`), one that sat out
        none, any other one; one each at gamma 0."""
        if not gamma:
            return float(len(self.acceptance))
        ready = min(max(self.ready[gamma], 0.0), 1.0) if self.ready is not None else 1.0
        one = max(0.0, 1.0 - ready - max(self.sat_out[gamma], 0.0)) if self.sat_out is not None else 1.0 - ready
        return sum(ready * expected_tokens(a, gamma) + one for a in self.acceptance)


def goodput(speculating: Sequence[Speculating], plain: int, gamma: int, period_s: float) -> float:
    """Expected tokens per second of a step of ``period_s`` seconds verifying
    ``gamma`` proposals per row, of the ``speculating`` sequences
    (:meth:`Speculating.tokens`) and ``plain`` rows that decode one token each."""
    tokens = sum(group.tokens(gamma) for group in speculating) + plain
    return tokens / period_s if period_s > 0 else 0.0


def choose_gamma(speculating: Sequence[Speculating], plain: int, period_s: Sequence[float], lowest: int = 0) -> int:
    """The gamma in ``[lowest, len(period_s) - 1]`` that maximises :func:`goodput`.

    ``speculating`` holds the sequences that may speculate, grouped by
    proposal method, ``plain`` the rows that never do, ``period_s[g]`` the
    expected seconds of a step verifying ``g`` proposals per row (``g = 0``:
    a plain decode step); every ``ready``/``sat_out`` list is as long as
    ``period_s``. Ties go to the smaller gamma (0 when nothing speculates
    and ``lowest`` is 0). Pure."""
    if not any(group.acceptance for group in speculating) or len(period_s) < 2:
        return 0
    lowest = min(max(lowest, 0), len(period_s) - 1)
    best, best_rate = lowest, goodput(speculating, plain, lowest, period_s[lowest])
    for g in range(lowest + 1, len(period_s)):
        rate = goodput(speculating, plain, g, period_s[g])
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = g, rate
    return best


#: Speculating steps a bucket measures for a proposer kind before what they delivered can overrule the
#: model (see :meth:`StepCosts.realized`).
REALIZED_MIN_STEPS = 3
#: ... and sequence-steps (running sequences times steps): a step of 2 sequences emits 2-12 tokens at
#: gamma 5, so 3 such steps judged a gamma on 6 rounds (2026-12-01: a 2-stream batch walked down from
#: gamma 7, measured to pay 1.75x, to none on three unlucky steps each of 5, 3, 2 and 1).
REALIZED_MIN_ROWS = 16


def realized_min_steps(batch: int) -> int:
    """Steps of ``batch`` running sequences counted before what a gamma delivered is read:
    :data:`REALIZED_MIN_STEPS`, or enough for :data:`REALIZED_MIN_ROWS` sequence-steps."""
    return max(REALIZED_MIN_STEPS, -(-REALIZED_MIN_ROWS // max(1, batch)))


def gate(gamma: int, speculating: Sequence[Speculating], plain: int, period_s: Sequence[float],
         realized: dict[int, float]) -> int:
    """The model's ``gamma`` (:func:`choose_gamma`) checked against what steps
    of each gamma delivered, as counted: ``realized[g]`` tokens per second per
    running sequence (:meth:`StepCosts.realized`), against a plain step's
    ``1 / period_s[0]``. Where no measured gamma lost, the model's choice
    stands. Where one did (a cost the model does not see: the draft's compute
    taking the target's cores, acceptance that is not geometric, which a long
    gamma pays most), the model chooses again among gammas up to half the
    shortest that lost (none when that is 1), and a gamma measured to deliver
    more than that choice, as measured or as the model expects it, is taken
    instead: a loss measured at one gamma does not overrule a gain measured at
    another. Pure."""
    if gamma == 0:
        return 0
    plain_rate = 1.0 / period_s[0]
    losing = [g for g, r in realized.items() if r < plain_rate]
    if not losing:
        return gamma
    cap = min(losing) // 2
    gamma = choose_gamma(speculating, plain, period_s[:cap + 1]) if cap else 0
    batch = plain + sum(len(group.acceptance) for group in speculating)
    rate = (plain_rate if gamma == 0 else
            realized.get(gamma, goodput(speculating, plain, gamma, period_s[gamma]) / max(1, batch)))
    won = {g: r for g, r in realized.items() if r >= plain_rate}
    if won:
        best = max(won, key=won.__getitem__)
        if won[best] > rate:
            return best
    return gamma

#: A step's forward or gap counts as at most this many times the bucket's average (:class:`Ewma`'s
#: ``clip``). 2026-12-01, 32 streams: one plain step that waited 50 ms for drafts had lifted the plain
#: period from 70 to 96 ms, and speculation was then judged against a plain step a third slower than it was.
STEP_COST_CLIP = 3.0


def _step_cost() -> "Ewma":
    return Ewma(clip=STEP_COST_CLIP)


def bucket(batch: int) -> int:
    """The batch-size bucket costs are kept under: 1, 2, 4, 8, ... (the
    smallest power of two >= ``batch``)."""
    return 1 << max(0, batch - 1).bit_length()


@dataclass
class Ewma:
    """An exponentially weighted moving average (the first sample sets it).
    With ``warm_up``, the first ``1 / weight`` samples are averaged alike
    (each weighs ``1 / n``), so that the first does not outweigh the next few.
    With ``clip``, a sample above ``clip`` times the average counts as that
    much (after the first): one step slowed by something else (a collection
    pause, a neighbour, the draft's compute) moves a step cost by at most
    ``weight * (clip - 1)`` of itself, while a lasting change still moves it
    that far at every step, as a robust (Huber-like) filter does."""

    value: float = 0.0
    samples: int = 0
    weight: float = 0.2
    warm_up: bool = False
    clip: float | None = None

    def add(self, x: float) -> None:
        if self.clip is not None and self.samples and self.value > 0:
            x = min(x, self.clip * self.value)
        self.samples += 1
        w = max(self.weight, 1.0 / self.samples) if self.warm_up else (1.0 if self.samples == 1 else self.weight)
        self.value = (1 - w) * self.value + w * x


def _line(points: dict[int, Ewma], x: int) -> float | None:
    """The value at ``x`` of the least-squares line through the measured
    points, its slope clamped at >= 0 (more tokens never cost less); the
    point itself where measured; None when nothing is."""
    if x in points:
        return points[x].value
    if not points:
        return None
    xs, ys = list(points), [p.value for p in points.values()]
    if len(xs) == 1:
        return ys[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    slope = max(0.0, sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx) if sxx else 0.0
    return max(min(ys), my + slope * (x - mx))


def _first_clipped(points: dict[int, Ewma], x: int, value: float) -> None:
    """Adds ``value`` to the forward cost at width ``x``; a new width's first
    sample counts as at most :data:`STEP_COST_CLIP` times what the line through
    the widths already measured says there (:func:`_line`), as later samples
    count against its own average. An estimate that is too high is never corrected:
    the model stops choosing that gamma, so nothing measures it again
    (2026-12-02, 2 streams on a loaded machine: one 750 ms verify of width 9,
    against 25 ms plain steps, priced every gamma above 0 out for the rest of
    the run). One too low is measured at the next step and moves up by the
    clip at each."""
    point = points.get(x)
    if point is None:
        ref = _line(points, x)
        point = points[x] = _step_cost()
        if ref is not None and ref > 0:
            value = min(value, STEP_COST_CLIP * ref)
    point.add(value)


@dataclass
class _Realized:
    """Speculating steps as they turned out: tokens emitted per running
    sequence, and seconds (gap and forward); moving averages."""

    tokens: Ewma = field(default_factory=lambda: Ewma(warm_up=True))
    seconds: Ewma = field(default_factory=lambda: Ewma(warm_up=True))
    #: Engine-clock time of the last step counted.
    at: float = 0.0

    def rate(self) -> float:
        """Tokens per second per running sequence (a ratio of the averages)."""
        return self.tokens.value / self.seconds.value


@dataclass
class _Bucket:
    #: tokens per row (gamma + 1) -> forward seconds
    forward: dict[int, Ewma] = field(default_factory=dict)
    #: proposer kind -> gamma -> seconds between the end of the last forward and the start of this one
    #: (gamma 0 under kind "": a plain step waits for no proposer)
    gap: dict[str, dict[int, Ewma]] = field(default_factory=dict)
    #: proposer kind -> gamma -> fractions of the speculating sequences verified / sitting out at a step of gamma
    ready: dict[str, dict[int, Ewma]] = field(default_factory=dict)
    sat_out: dict[str, dict[int, Ewma]] = field(default_factory=dict)
    #: (proposer kind, gamma) -> steps in which the cost model speculated with that gamma, as they turned out
    realized: dict[tuple[str, int], "_Realized"] = field(default_factory=dict)
    #: Engine-clock time of the last step that verified proposals in this bucket.
    speculated_at: float | None = None
    #: Engine-clock time of the last plain decode step measured in this bucket.
    plain_at: float | None = None


class StepCosts:
    """Measured step costs per batch-size bucket (see the module docstring):
    the forward seconds for each tokens-per-row width and the gap before the
    forward for each gamma. Engine thread only."""

    def __init__(self) -> None:
        self._buckets: dict[int, _Bucket] = {}
        #: (bucket, gamma_max, kind) -> periods(), until the next observation (a step's reviews ask alike)
        self._periods: dict[tuple[int, int, str], list[float] | None] = {}

    def observe(self, batch: int, gamma: int, forward_s: float, gap_s: float | None, now: float,
                kind: str = "") -> None:
        """A forward of ``batch`` rows of ``gamma + 1`` tokens took ``forward_s``
        and started ``gap_s`` after the previous forward ended (None: not
        measurable, e.g. the engine was idle in between), the proposals coming
        from proposers of ``kind`` (a draft model and a lookup differ in what
        the batch waits for)."""
        self._periods.clear()
        b = self._buckets.setdefault(bucket(batch), _Bucket())
        _first_clipped(b.forward, gamma + 1, forward_s)
        if gap_s is not None:  # not clipped: a verify's gap (its wait for drafts) may well be 10x a plain step's
            b.gap.setdefault(kind if gamma else "", {}).setdefault(gamma, _step_cost()).add(max(0.0, gap_s))
        if gamma > 0:
            b.speculated_at = now
        else:
            b.plain_at = now

    def observe_readiness(self, batch: int, gamma: int, kind: str, ready: float, sat_out: float) -> None:
        """At a step for which gamma ``gamma`` was chosen with ``batch``
        sequences running, a fraction ``ready`` of the speculating ones that
        propose with ``kind`` was verified and ``sat_out`` sat the step out
        waiting for their drafts. Fractions are clamped to [0, 1]."""
        b = self._buckets.setdefault(bucket(batch), _Bucket())
        b.ready.setdefault(kind, {}).setdefault(gamma, Ewma()).add(min(max(ready, 0.0), 1.0))
        b.sat_out.setdefault(kind, {}).setdefault(gamma, Ewma()).add(min(max(sat_out, 0.0), 1.0))

    def observe_realized(self, batch: int, kind: str, gamma: int, tokens: int, seconds: float, now: float) -> None:
        """A step in which the cost model speculated with ``gamma``, with
        ``batch`` sequences running and proposals from proposers of ``kind``,
        emitted ``tokens`` (verified ones and the target's own, one per row
        without a proposal, none for a sequence that sat the step out) in
        ``seconds`` (the gap before its forward and the forward), counted at
        ``now``. Ignored unless both are positive numbers of sequences and seconds."""
        if batch <= 0 or seconds <= 0:
            return
        b = self._buckets.setdefault(bucket(batch), _Bucket())
        r = b.realized.setdefault((kind, gamma), _Realized())
        r.tokens.add(tokens / batch)
        r.seconds.add(seconds)
        r.at = now

    def realized(self, batch: int, kind: str, gamma: int, now: float, max_age_s: float,
                 min_steps: int = REALIZED_MIN_STEPS) -> float | None:
        """Tokens per second per running sequence that steps speculating with
        ``gamma`` at this batch size's bucket with proposers of ``kind``
        delivered (recent steps weigh most), None before ``min_steps`` were
        counted. A record whose last step is more than ``max_age_s`` before
        ``now`` is dropped (None): the machine may have changed, and its steps
        are counted afresh. Below a plain step's ``1 / period(batch, 0)``,
        speculating so lost, whatever the model expected: it missed a cost
        (the draft's compute taking the target's cores, catch-up rounds,
        acceptance that is not geometric, which a long gamma pays most)."""
        b = self._buckets.get(bucket(batch))
        r = b.realized.get((kind, gamma)) if b is not None else None
        if r is None:
            return None
        if now - r.at > max_age_s:
            del b.realized[(kind, gamma)]
            return None
        if r.seconds.samples < min_steps or r.seconds.value <= 0:
            return None
        return r.rate()

    def readiness(self, batch: int, gamma_max: int, kind: str = "") -> tuple[list[float], list[float]]:
        """For gamma 0..gamma_max, the fractions of the speculating sequences
        that propose with ``kind`` expected to be verified and to sit out at a
        step of that gamma (:class:`Speculating`'s ``ready`` and ``sat_out``): the measurement at the
        nearest gamma measured for ``kind`` in this batch size's bucket (the
        smaller gamma on a tie); 1.0 and 0.0 where there is none for ``kind``."""
        b = self._buckets.get(bucket(batch))
        ready = b.ready.get(kind, {}) if b is not None else {}
        out = b.sat_out.get(kind, {}) if b is not None else {}
        if not ready:
            return [1.0] * (gamma_max + 1), [0.0] * (gamma_max + 1)
        near = [min(ready, key=lambda m: (abs(m - g), m)) for g in range(1, gamma_max + 1)]
        return [1.0] + [ready[m].value for m in near], [0.0] + [out[m].value for m in near]

    def period(self, batch: int, gamma: int, kind: str = "") -> float | None:
        """Expected seconds of a step of ``batch`` rows verifying ``gamma``
        proposals each (0: plain decode) from proposers of ``kind``, None when
        nothing was measured for this batch size's bucket."""
        b = self._buckets.get(bucket(batch))
        if b is None:
            return None
        forward = _line(b.forward, gamma + 1)
        if forward is None:
            return None
        gaps = {**b.gap.get("", {}), **(b.gap.get(kind, {}) if gamma else {})}
        return forward + (_line(gaps, gamma) or 0.0)

    def periods(self, batch: int, gamma_max: int, kind: str = "") -> list[float] | None:
        """:meth:`period` for gamma 0..gamma_max, None when unmeasured. The
        same list until the next :meth:`observe` (read it, do not change it)."""
        key = (bucket(batch), gamma_max, kind)
        if key not in self._periods:
            out = [self.period(batch, g, kind) for g in range(gamma_max + 1)]
            self._periods[key] = None if any(p is None for p in out) else out
        return self._periods[key]

    def speculated_at(self, batch: int) -> float | None:
        """When a step of this batch size's bucket last verified proposals."""
        b = self._buckets.get(bucket(batch))
        return b.speculated_at if b is not None else None

    def plain_at(self, batch: int) -> float | None:
        """When a plain decode step of this batch size's bucket was last measured."""
        b = self._buckets.get(bucket(batch))
        return b.plain_at if b is not None else None

    def table(self) -> dict[int, dict[str, dict[int, float]]]:
        """The measurements, for reports: bucket -> {"forward_ms": {width: ms}, "gap_ms": {"kind:gamma": ms},
        "ready": {"kind:gamma": fraction}, "sat_out": {"kind:gamma": fraction},
        "realized_tokens_per_s": {"kind:gamma": per running sequence}}."""
        return {k: {"forward_ms": {w: round(e.value * 1000, 3) for w, e in sorted(b.forward.items())},
                    "gap_ms": {f"{kind}:{g}" if kind else g: round(e.value * 1000, 3)
                               for kind, cells in sorted(b.gap.items()) for g, e in sorted(cells.items())},
                    "ready": {f"{kind}:{g}": round(e.value, 3)
                              for kind, cells in sorted(b.ready.items()) for g, e in sorted(cells.items())},
                    "sat_out": {f"{kind}:{g}": round(e.value, 3)
                                for kind, cells in sorted(b.sat_out.items()) for g, e in sorted(cells.items())},
                    "realized_tokens_per_s": {f"{kind}:{g}": round(r.rate(), 3)
                                              for (kind, g), r in sorted(b.realized.items())
                                              if r.seconds.value > 0}}
                for k, b in sorted(self._buckets.items())}


@dataclass
class Acceptance:
    """A sequence's per-token acceptance probability, estimated from its rounds:
    a round that kept ``n`` of ``gamma`` proposals is ``n`` successes and, when
    ``n < gamma``, one failure of a geometric trial (the maximum-likelihood
    estimate of alpha under Leviathan's model); counts decay by ``decay`` per
    round so that the estimate follows the text. ``prior`` pseudo-rounds of
    ``prior_alpha`` (the engine-wide estimate) stand in before the first rounds."""

    successes: float = 0.0
    failures: float = 0.0
    decay: float = 0.8

    def update(self, accepted: int, gamma: int) -> None:
        self.successes = self.decay * self.successes + accepted
        self.failures = self.decay * self.failures + (1.0 if accepted < gamma else 0.0)

    def alpha(self, prior_alpha: float, prior: float = 1.0) -> float:
        """The estimate, shrunk towards ``prior_alpha`` by ``prior`` pseudo-trials."""
        n = self.successes + self.failures
        return (self.successes + prior * prior_alpha) / (n + prior)
